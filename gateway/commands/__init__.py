"""Commands to machines: signed, recorded, published, and followed through their replies.

`models` holds the `commands` table, `sender` signs, records and publishes (`issue_many`),
`publisher` is the MQTT connection that sends, and `replies` stores what machines answer and runs
each feature's reply hook.
"""
