"""The gateway's MQTT broker: its PKI, the supervised Mosquitto, and device credentials.

Import the submodules directly (`gateway.broker.mosquitto`, `.dynsec`, `.pki`, `.mqtt_url`);
this package keeps no state of its own.
"""
