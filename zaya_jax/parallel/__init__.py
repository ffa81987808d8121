"""shard_map code the model itself calls, given mesh axis names as arguments (expert dispatch, context
parallelism); it imports nothing above zaya_jax/."""
