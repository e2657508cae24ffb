"""Identity and trust shared by both sides: keys, JWT/JWS, tokens, wire envelopes."""
