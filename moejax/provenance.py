"""What a result file records about where it was computed: the jax version and
the devices, so that numbers from different machines are never mixed."""

import jax


def provenance(device_count: int | None = None) -> dict:
  """{jax_version, devices: "N x KIND"}; N defaults to every device of the job."""
  count = jax.device_count() if device_count is None else device_count
  return dict(jax_version=jax.__version__, devices=f"{count} x {jax.devices()[0].device_kind}")
