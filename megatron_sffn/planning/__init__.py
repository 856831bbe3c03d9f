"""Plan a run without running it: layout, memory, expected speed and the device figures they rest on.

:mod:`.devices` (the accelerator table, shared with the trainer's MFU),
:mod:`.memory` (bytes per process), :mod:`.plan` (the layout and the whole
plan) and :mod:`.report` (its text and the ``python -m megatron_sffn.planning``
command line).  Nothing here trains, allocates on a device or starts a
process group.
"""
