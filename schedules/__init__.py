"""TensorIR kernel factories and per-target schedule configs."""
