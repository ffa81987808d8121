"""Training-side code for zaya-jax: data pipeline, optimizers and schedules, the router-bias balancer."""
