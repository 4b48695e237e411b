"""Packed trials: the LoRA trials of a sweep batch that train the same base model on the same data
run in one process, over one frozen base model, each with its own adapter. `plan` decides which
trials can share a process (pure: no torch); `lora` holds the routed adapters, one a trial;
`lanes` is a trial's state in the pack; `trainer` is the packed training loop; `run` is a pack's
Hydra job, which trains its trials and returns one result a trial. The sweeper side (which trials
are launched together, their folders) is `dpo_sweep.sweep.packs`."""
