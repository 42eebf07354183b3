"""What keeps upstream libraries honest here, each fix pinned to the version it was written for and
checked at use (an ``UpstreamError`` says what changed):

- ``megatron_cpu``: megatron-core 0.16 on CPU (its CUDA RNG, scratch buffers and the pipeline
  schedule's CUDA calls); a no-op on GPUs.
- ``deepspeed_megatron``: three fixes DeepSpeed 0.19.8's ZeRO-3 needs under megatron's pipeline
  schedule (trace check over the DP group, backward counting per forward, release after recompute).
- ``deepspeed_shm``: DeepSpeed's CPU comm op never unlinks its /dev/shm buffers.
- ``build_lock``: a JIT build killed mid-way leaves a lock every later build waits on forever.
"""
