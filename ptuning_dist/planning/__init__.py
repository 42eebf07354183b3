"""Planning without machines: model shapes, layout rules, the per-rank memory model and the planner.

Pure arithmetic over ``config.json`` shapes: importing this package imports neither torch nor
megatron-core nor DeepSpeed (``python -c "import ptuning_dist.planning"``), so a layout for a 530B
backbone is sized on a laptop in milliseconds. Only the prompt encoder's parameter count comes
from the encoder module itself (built on torch's meta device, on first use).
"""
