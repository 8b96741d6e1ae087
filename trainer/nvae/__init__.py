"""NVAE pretraining: the loop (`loop`), the objective (`objective`) and the learning-rate schedule (`schedules`)."""
