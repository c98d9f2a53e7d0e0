"""What a surgered model runs in forward: the Mixout layers (:mod:`.mixout`; fused experts and
routers: :mod:`.experts`), which all take a module's place the same way (:mod:`.swap`), the multi-sample
dropout hooks (:mod:`.msd`) and the layer-weighted head's pooling (:mod:`.layer_pool`).
``surgery.regularizers`` decides where they go."""
