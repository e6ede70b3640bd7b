"""The FedMask wire protocol, imported by the aggregator, the device agent and the simulator.

- ``topics``: the topic tree ``fedmask/v1/<fleet>/...`` and id validation
- ``messages``: typed messages, ``encode`` / ``decode`` with checksums and full validation
- ``tensor_codec``: how a strategy body's arrays are coded (bit-packed masks, floats, top-k)
- ``chunking``: ``split`` / ``Reassembler`` / ``wire_size`` under a maximum MQTT payload
- ``staleness``: the weight of a late update in an asynchronous round
- ``broker_url``: ``mqtt://`` / ``mqtts://`` URLs and credentials
- ``transport``: ``MqttConnection``, the paho-mqtt wrapper
- ``errors``: ``ProtocolError`` and the ``Rejection`` reasons every layer uses

The contract is written down in docs/protocol.md.
"""

from fedmask.protocol.errors import ProtocolError, Rejection

__all__ = ["ProtocolError", "Rejection"]
