"""Tensor-parallel structured FFN linears for megatron-core (see docs/tensor-parallel.md).

The package itself imports nothing: the structure plans and the cost model
(:mod:`.plans`, :mod:`.plan`, :mod:`.layout`) are pure Python, and the
planning tools read them without loading megatron-core.  Import the modules
by name: ``from megatron_sffn.parallel.mlp_spec import mlp_spec``,
``from megatron_sffn.parallel.plan import choose_strategy``, ...
"""
