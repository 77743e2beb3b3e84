"""L3 tables kept in host memory (moejax/papers/l3/host.py): a forward on the compact
per-batch tables gives the device-resident model's logits and eval metrics, and
ships fewer rows than the table for small batches, in power-of-two buckets."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import sharding
from moejax import train as train_lib
from moejax.papers.l3.host import HostTables, evaluate_with_host_tables, make_forward
from moejax.model.transformer import Transformer
from tests.helpers import tiny_config

VOCAB, ROWS, K, SEQ = 64, 200, 8, 16


def _counts():
  """Non-uniform rows per id in [1, K] summing to ROWS; the first id owns K
  rows and the last one row."""
  rng = np.random.default_rng(0)
  c = np.ones(VOCAB, np.int64)
  c[0] = K
  while c.sum() < ROWS:
    i = int(rng.integers(1, VOCAB - 1))
    c[i] += c[i] < K
  return c


def _cfg(path="padded", tie_kv=False):
  return tiny_config(**{"l3.after_layers": (1, 2), "l3.rows": ROWS,
                        "l3.max_rows_per_token": K, "l3.emb_dim": 32 if tie_kv else 16,
                        "l3.up_dim": 16, "l3.tie_kv": tie_kv, "l3.path": path,
                        "l3.init_std": 0.5})


def _randomize_w_mix(params, seed=1):
  """Nonzero W_mix (it starts at zero), so the L3 reads reach the logits."""
  rng = np.random.default_rng(seed)
  pairs = [(k, v.replace(0.3 * rng.normal(size=v.shape).astype(np.float32))
            if k[-1] == "w_mix" else v) for k, v in params.flat_state()]
  return nnx.State.from_flat_path(pairs)


def _model(path, tie_kv):
  model = Transformer(_cfg(path, tie_kv), VOCAB, nnx.Rngs(params=0), inputs={"l3": _counts()})
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, _randomize_w_mix(params), rest


def _batches():
  """[2, SEQ] token batches: random ids, one id throughout, the first and last ids."""
  rng = np.random.default_rng(2)
  mixed = rng.integers(0, VOCAB, (2, SEQ))
  edges = rng.integers(0, VOCAB, (2, SEQ))
  edges[0, 0], edges[1, -1], edges[1, 3] = 0, VOCAB - 1, 0
  return {"mixed": mixed, "one_id": np.full((2, SEQ), 7), "first_and_last": edges}


def _check_same(got, want, name):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5, err_msg=name)
  assert set(got[1]) == set(want[1])
  for key in want[1]:
    np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-5, atol=1e-6,
                               err_msg=f"{name} {key}")


@pytest.mark.parametrize("path, tie_kv", [("padded", False), ("sorted", False),
                                          ("padded", True), ("sorted", True)])
def test_host_tables_give_the_device_logits(path, tie_kv):
  graphdef, params, rest = _model(path, tie_kv)
  forward = make_forward(graphdef)
  batches = _batches()
  want = {name: forward(params, rest, tokens) for name, tokens in batches.items()}
  # One bucket size for every batch (one compile); "one_id" is then mostly padding.
  host = HostTables.from_state(params, rest, min_rows=128)
  assert len(host.layers) == 2 and host.table_rows == 2 * ROWS
  # Nothing of the full tables is kept on device.
  assert all(host.params["l3"][i]["keys"].shape[0] == 0 for i in range(2))
  for name, tokens in batches.items():
    params_b, rest_b = host.batch_state(tokens)
    _check_same(forward(params_b, rest_b, tokens), want[name], name)
    ids = np.unique(tokens)
    assert host.last.distinct_ids == ids.size
    assert host.last.rows == 2 * int(_counts()[ids].sum())
    assert host.last.bucket_rows == 2 * 128 < host.last.table_rows
    for i in range(2):
      assert params_b["l3"][i]["keys"].shape[0] == 128
      if not tie_kv:
        assert params_b["l3"][i]["values"].shape[0] == 128
  # The rows matter: tables shipped for another batch give other logits.
  params_b, rest_b = host.batch_state(batches["one_id"])
  wrong = forward(params_b, rest_b, batches["mixed"])[0]
  assert np.abs(np.asarray(wrong) - np.asarray(want["mixed"][0])).max() > 1e-3


@pytest.mark.parametrize("path", ["padded", "sorted"])
def test_decode_ships_one_small_bucket(path):
  graphdef, params, rest = _model(path, False)
  forward = make_forward(graphdef)
  host = HostTables.from_state(params, rest)
  assert host.min_rows == K
  assert [host.bucket(n, ROWS) for n in (1, K, K + 1, 100, 128, 129, ROWS)] == [
      K, K, 16, 128, 128, ROWS, ROWS]  # powers of two, capped at the table
  for token in (0, VOCAB - 1):  # K rows and one row
    tokens = np.array([[token]])
    params_b, rest_b = host.batch_state(tokens)
    _check_same(forward(params_b, rest_b, tokens), forward(params, rest, tokens),
                f"decode {token}")
    assert params_b["l3"][0]["keys"].shape == (K, 32)
    s = host.last
    rows = int(_counts()[token])
    assert (s.distinct_ids, s.rows, s.bucket_rows) == (1, 2 * rows, 2 * K)
    # keys + values of both layers, and one offsets array shared by both layers
    assert s.bytes == 2 * K * (32 + 16) * 4 + VOCAB * 4
    assert s.fraction == pytest.approx(2 * K / (2 * ROWS))
    assert s.gather_s >= 0 and s.transfer_s >= 0
  with pytest.raises(ValueError, match="outside the vocabulary"):
    host.batch_state(np.array([[VOCAB]]))


class _EvalData:
  """What train.evaluate reads from an eval iterator: iter_eval(n) over local batches."""

  def __init__(self, batches):
    self.batches = batches

  def iter_eval(self, max_batches=None):
    return iter(self.batches[:max_batches])


def test_evaluate_with_host_tables_equals_train_evaluate():
  cfg = _cfg("sorted", False)
  rng = np.random.default_rng(3)
  batches = []
  for tokens in (_batches()["mixed"], _batches()["first_and_last"]):
    weights = np.ones(tokens.shape, np.float32)
    weights[:, -3:] = 0
    batches.append(dict(inputs=tokens.astype(np.int32),
                        targets=rng.integers(0, VOCAB, tokens.shape).astype(np.int32),
                        segment_ids=np.ones(tokens.shape, np.int32),
                        positions=np.broadcast_to(np.arange(SEQ, dtype=np.int32),
                                                  tokens.shape).copy(),
                        weights=weights))
  bytes_per_token = rng.integers(1, 4, VOCAB).astype(np.float32)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  _, params, rest = _model("sorted", False)
  with sharding.use_mesh(mesh, cfg.sharding.rules):
    spec = train_lib.StateSpec(cfg, VOCAB, mesh, optax.sgd(0.1), inputs={"l3": _counts()})
    state = dict(params=params, model_state=rest)
    want = train_lib.evaluate(train_lib.make_eval_step(spec), state, _EvalData(batches),
                              jax.numpy.asarray(bytes_per_token), mesh, 2, 0)
  host = HostTables.from_state(state["params"], state["model_state"])
  got, shipments = evaluate_with_host_tables(spec.graphdef, host, batches, bytes_per_token)
  assert set(got) == set(want)
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-5), k
  assert [s.distinct_ids for s in shipments] == [np.unique(b["inputs"]).size for b in batches]
  assert all(0 < s.bytes and s.bucket_rows < s.table_rows for s in shipments)
