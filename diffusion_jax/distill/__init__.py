"""Distillation tasks: a frozen teacher run trains a student that samples in few steps.

progressive.py       Salimans & Ho 2022: the student's one DDIM step matches two of the teacher's
progressive_task.py  the task (`task = "progressive"`): teacher, student, rounds, the train step
consistency_task.py  consistency distillation and iCT (`task = "consistency"`; the maths in
                     diffusion_jax/consistency.py)
teacher.py           the teacher read from its workdir, checked against the student's config
student.py           what both tasks share: the student's sections, batches and first state
"""
