"""facepipe: faces from edge cameras to S3 over MQTT."""

__version__ = "0.1.0"
