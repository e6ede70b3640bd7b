"""FedMask over MQTT: personalized federated learning with binary masks for IoT fleets."""

__version__ = "0.1.0"
