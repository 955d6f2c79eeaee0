"""fx-graph infrastructure that knows nothing of attention or ASR.

``ops`` (one canonical name per operation), ``layout`` (which axis is batch, channel,
space), ``capture`` (model -> GraphModule with shapes), ``dataflow`` (what each value
depends on), ``layers`` (where a layer's parameters live), ``edit`` (graph-editing helpers).
"""
