"""Starting runs: torchrun on one or many nodes (`launch.local`) and SLURM jobs that requeue
themselves on preemption (`launch.slurm`). Never imports train/: it starts `python -m train`."""
