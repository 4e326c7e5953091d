"""DeepSpeed ZeRO-1/2/3: gradient projection on the engine's own partitioned gradient buffers.

``attach_engine(engine, reference_fn=...)`` (handle.py) patches the engine's ``backward`` (the capability
micro-step at the start of each accumulation window) and its ZeRO optimizer's ``step`` (the projection, before the
norm, clipping and update). partitions.py knows where each ZeRO stage keeps a rank's reduced gradient and refuses
the configurations it does not serve; checkpoint.py puts the handle's per-rank state into the engine's
checkpoints (``engine.save_checkpoint`` / ``load_checkpoint``, patched too). ``attach_activation(engine,
subspace)`` (activation.py; also ``attach_engine(engine, reference=subspace)``) projects the realised update of
each protected weight off its ActivationSubspace basis on the rank's fp32 master partition. Importing this
package does not import deepspeed. See docs/deepspeed.md.
"""
from __future__ import annotations

from .activation import ActivationEngineHandle, attach_activation
from .checkpoint import load_reference
from .handle import EngineHandle, attach_engine, capture_reference, partition_subspace
from .partitions import PartitionedReference, ZeroPartitions, check_supported

__all__ = ["attach_engine", "attach_activation", "ActivationEngineHandle", "partition_subspace", "capture_reference", "load_reference", "EngineHandle", "PartitionedReference",
           "ZeroPartitions", "check_supported"]
