"""Training: the task-neutral loop, the task interface and registry, and the diffusion task.

The modules:

  loop            train_and_evaluate(config, workdir): the loop any task runs
  task, tasks     the Task interface and its Hook; the registry of tasks by config.task
  state           the train state, the update every task's step ends with, the metrics
  run_config      what a resumed run may change in its config, and the record of it
  diffusion_task  the diffusion task: a config made concrete (model, process, data, step)
  diffusion_step  diffusion's pure jitted train step
  optimizer       the optax optimizer of an OptimConfig
  sample_grids    the diffusion task's hooks: sample grids, and periodic_eval's FID

Typical use:

    from diffusion_jax.train import loop
    state = loop.train_and_evaluate(config, workdir)   # resumes from workdir's latest checkpoint
"""
