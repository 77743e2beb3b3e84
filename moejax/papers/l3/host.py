"""L3 tables in host memory for evaluation and inference: ship only the rows a batch reads.

The paper (docs/papers/l3.md §e) keeps L3 tables in CPU memory at inference and sends
over PCIe only the rows {K_t, V_t} of the tokens being processed. Here:

  host = HostTables.from_state(params, model_state)   # tables -> host numpy
  del params, model_state                              # frees the device tables
  params_b, state_b = host.batch_state(tokens)         # compact tables on device
  logits, aux = nnx.merge(graphdef, params_b, state_b)(tokens)

For a batch with distinct ids u_1 < ... < u_n, each L3 layer's keys (and values)
become the concatenated runs of rows those ids own, zero-padded to a bucket of
2^j rows (at least the next power of two above the largest count, so one
decoded token always fits the smallest bucket; at most the full table), and its
offsets point into that compact table. Only a few bucket shapes ever compile.
Ids absent from the batch get offset n (the number of real rows): the lookup
never reads them, and keeping offsets[-1] + counts[-1] >= n keeps the sorted
path's out-of-range slot indices above every real row (its sorted / unique
gather hints stay true). Counts are unchanged, so the l3_entropy metrics match.

`evaluate_with_host_tables` runs the eval forward per batch on such state and
returns train.evaluate's metrics, plus per batch: distinct ids, rows shipped,
bytes shipped, host gather and transfer seconds (a Shipment).

Limits:
  * One device, one process: the compact tables are plain replicated arrays.
    Under a mesh whose `expert` axis is > 1 the layer would split them by rows
    (moejax/papers/l3/parallel.py); evaluate_with_host_tables refuses that case.
  * A batch of T tokens needs up to min(rows, T * max_rows_per_token) rows per
    layer (fewer with repeated ids). For large eval batches most of the table
    ships on every batch; the win is for small batches, decoding above all
    (one token: at most max_rows_per_token rows per layer), as in the paper.
  * Each new bucket size compiles the forward once more (log2(rows) sizes at most).
  * The gather and the copy are synchronous here; the paper hides the copy
    behind the decoder layers before the first L3 layer (not done).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.papers.l3.layer import L3Index
from moejax.train import BATCH_KEYS, eval_sums, metrics_from_batches

TABLES = ("keys", "values")


@dataclasses.dataclass
class Shipment:
  """What one batch sent to the device, summed over the L3 layers."""
  distinct_ids: int
  rows: int            # real rows (the runs the batch's ids own)
  bucket_rows: int     # rows of the compact tables, padding included
  table_rows: int      # rows of the full tables, for the fraction shipped
  bytes: int           # compact tables (padded) + offsets
  gather_s: float      # host: unique ids, row indices, numpy gather
  transfer_s: float    # device_put until the arrays are ready

  @property
  def fraction(self) -> float:
    return self.bucket_rows / max(self.table_rows, 1)


@dataclasses.dataclass
class _Layer:
  """One L3 layer's host tables and CSR index (prefix: its path in the state)."""
  prefix: tuple
  tables: dict          # "keys" / "values" -> np.ndarray [rows, width]
  offsets: np.ndarray   # int32 [vocab]
  counts: np.ndarray    # int32 [vocab]
  group: int            # layers with the same index share the row computation


def next_pow2(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class HostTables:
  """The L3 tables of a model in host memory, and per-batch compact device state."""

  def __init__(self, params, model_state, layers: list, *, min_rows: int, device):
    self.params, self.model_state = params, model_state  # tables: empty placeholders
    self.layers, self.min_rows, self.device = layers, min_rows, device
    self.vocab = int(layers[0].offsets.shape[0])
    self.table_rows = sum(int(l.tables["keys"].shape[0]) for l in layers)
    self.last: Shipment | None = None

  @classmethod
  def from_state(cls, params, model_state, *, min_rows: int | None = None,
                 device=None) -> "HostTables":
    """Pulls each L3 layer's keys/values to host numpy; the returned object keeps
    the rest of the state on `device` (default: the first) and no full table
    there, so dropping the caller's references frees the device tables.

    min_rows: the smallest bucket (default: next power of two >= the largest
    count, so a single token always fits it)."""
    if jax.process_count() > 1:
      raise ValueError("Host L3 tables are single-process: each process would ship its "
                       "own rows into arrays the mesh does not know.")
    device = device or jax.devices()[0]
    flat_p, flat_s = dict(params.flat_state()), dict(model_state.flat_state())
    prefixes = [k[:-1] for k, v in flat_s.items()
                if k[-1] == "offsets" and isinstance(v, L3Index)]
    if not prefixes:
      raise ValueError("The state holds no L3 layer (no L3Index 'offsets').")
    layers, groups = [], []
    for prefix in sorted(prefixes, key=str):
      offsets = np.asarray(jax.device_get(flat_s[prefix + ("offsets",)][...]), np.int32)
      counts = np.asarray(jax.device_get(flat_s[prefix + ("counts",)][...]), np.int32)
      tables = {name: np.asarray(jax.device_get(flat_p[prefix + (name,)][...]))
                for name in TABLES if prefix + (name,) in flat_p}
      rows = tables["keys"].shape[0]
      if not np.array_equal(offsets, np.cumsum(counts) - counts) or counts.sum() != rows:
        raise ValueError(f"L3 layer {prefix}: offsets must be the exclusive cumsum of "
                         f"counts and the counts must sum to the {rows} table rows.")
      group = next((i for i, (o, c) in enumerate(groups)
                    if np.array_equal(o, offsets) and np.array_equal(c, counts)), None)
      if group is None:
        group = len(groups)
        groups.append((offsets, counts))
      layers.append(_Layer(prefix, tables, offsets, counts, group))
    if min_rows is None:
      min_rows = next_pow2(max(int(l.counts.max()) for l in layers))
    # The state kept here has empty tables: nothing of the full tables stays on device.
    empty = {l.prefix + (name,): np.zeros((0,) + t.shape[1:], t.dtype)
             for l in layers for name, t in l.tables.items()}
    base_p = _replace(params, empty)
    base_p, base_s = jax.device_put((base_p, model_state), device)
    return cls(base_p, base_s, layers, min_rows=min_rows, device=device)

  def bucket(self, rows: int, table_rows: int) -> int:
    """Compact table size for `rows` real rows: a power of two >= min_rows, capped
    at the full table."""
    return min(max(self.min_rows, next_pow2(rows)), table_rows)

  def batch_state(self, token_ids):
    """(params, model_state) whose L3 tables hold only the rows of `token_ids`'
    distinct ids (padded to a bucket), on device; self.last says what shipped."""
    t0 = time.perf_counter()
    ids = np.unique(np.asarray(token_ids).reshape(-1))
    if ids.size and (ids[0] < 0 or ids[-1] >= self.vocab):
      raise ValueError(f"token ids lie in [{ids[0]}, {ids[-1]}], outside the "
                       f"vocabulary [0, {self.vocab}).")
    index = {}  # group -> (row indices into the full table, n, prefix of its offsets)
    new_p, new_s = {}, {}
    rows = bucket_rows = nbytes = 0
    for layer in self.layers:
      if layer.group not in index:
        c = layer.counts[ids].astype(np.int64)
        start = np.cumsum(c) - c  # each id's first row in the compact table
        n = int(c.sum())
        idx = np.repeat(layer.offsets[ids] - start, c) + np.arange(n)
        offsets = np.full(self.vocab, n, np.int32)  # absent ids: never read
        offsets[ids] = start
        index[layer.group] = (idx, n, layer.prefix)
        new_s[layer.prefix + ("offsets",)] = offsets  # shipped once per group
        nbytes += offsets.nbytes
      idx, n, _ = index[layer.group]
      size = self.bucket(n, layer.tables["keys"].shape[0])
      for name, table in layer.tables.items():
        compact = np.empty((size,) + table.shape[1:], table.dtype)  # fresh: never aliased
        np.take(table, idx, axis=0, out=compact[:n])
        compact[n:] = 0
        new_p[layer.prefix + (name,)] = compact
        nbytes += compact.nbytes
      rows, bucket_rows = rows + n, bucket_rows + size
    t1 = time.perf_counter()
    # Lists, not the dicts: their tuple keys need not be sortable as a pytree.
    on_p, on_s = jax.block_until_ready(
        jax.device_put((list(new_p.values()), list(new_s.values())), self.device))
    new_p, new_s = dict(zip(new_p, on_p)), dict(zip(new_s, on_s))
    t2 = time.perf_counter()
    for layer in self.layers:  # layers sharing an index share its device array
      new_s[layer.prefix + ("offsets",)] = new_s[index[layer.group][2] + ("offsets",)]
    self.last = Shipment(distinct_ids=int(ids.size), rows=rows, bucket_rows=bucket_rows,
                         table_rows=self.table_rows, bytes=nbytes, gather_s=t1 - t0,
                         transfer_s=t2 - t1)
    return _replace(self.params, new_p), _replace(self.model_state, new_s)


def _replace(state, new: dict):
  """A copy of an nnx.State with the variables at the given flat paths holding new values."""
  pairs = [(k, v.replace(new[k]) if k in new else v) for k, v in state.flat_state()]
  return nnx.State.from_flat_path(pairs)


def make_forward(graphdef) -> Callable:
  """jit (params, model_state, tokens) -> (logits, aux): the eval forward (e.g. decoding)."""

  @jax.jit
  def forward(params, model_state, tokens):
    return nnx.merge(graphdef, params, model_state)(tokens, train=False)

  return forward


def make_eval_step(graphdef) -> Callable:
  """train.make_eval_step's computation, unsharded (shapes change with the bucket)."""

  return jax.jit(functools.partial(eval_sums, graphdef))


def evaluate_with_host_tables(graphdef, host: HostTables, batches: Iterable[dict],
                              bytes_per_token, *, max_batches: int = 0,
                              eval_step: Callable | None = None):
  """train.evaluate's metrics (eval/loss, perplexity, bits_per_byte, tokens) over
  `batches` (dicts of numpy arrays: inputs, targets, segment_ids, positions,
  weights), shipping each batch's L3 rows from host; -> (metrics, [Shipment])."""
  mesh = sharding.active_mesh()
  if mesh is not None and mesh.shape.get("expert", 1) > 1:
    raise ValueError("Host L3 tables are single-device: evaluate outside a mesh with "
                     "an expert axis > 1.")
  eval_step = eval_step or make_eval_step(graphdef)
  bytes_per_token = jax.device_put(jnp.asarray(bytes_per_token, jnp.float32), host.device)
  pending, shipments = [], []
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    params, model_state = host.batch_state(batch["inputs"])
    shipments.append(host.last)
    batch = jax.device_put({k: np.asarray(batch[k]) for k in BATCH_KEYS}, host.device)
    pending.append(eval_step(params, model_state, batch, bytes_per_token))
  return metrics_from_batches(jax.device_get(pending)), shipments
