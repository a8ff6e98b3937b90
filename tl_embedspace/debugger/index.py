"""The value index: every feed-forward value vector's top and bottom tokens in vocabulary space,
built once with exact two-sided top-k (``core.two_sided_topk``, the project's chunk sizing and tie
rule), stored in one SQLite file under the user's cache, keyed by a hash of the weights it was
computed from; plus exact token search, concept (enrichment) search and k-means clustering.

* The file name and its ``meta`` table carry the blake2b hash of W_out, the readout basis (W_U with
  the final norm's weight) and, with ``heads=True``, W_O: a changed model never finds the old file,
  and a file whose stored hash, shapes or content checksum disagree is rebuilt with a warning.
* Layers are committed to ``<file>.partial`` as they are built; an interrupted build resumes there.
* Under ``torchrun`` (:mod:`tl_plugins.distributed`) each rank builds a contiguous share of the
  blocks into its own ``<file>.rankRRRRR-ofWWWWW.partial``; rank 0 copies them, in the one-process
  order, into the file a one-process build writes (same blocks, same checksum) and removes the shards.
* Search never reads stale or truncated lists: token scores are recomputed exactly from the value
  vectors (``v . B[:, t]``, standardised by each value's mean and std over the vocabulary, which the
  index stores), so ``search`` is exact for any token, in or out of the stored top lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from tl_embedspace.debugger import core
from tl_embedspace.debugger.model import (
    debug_weights,
    resolve_tokens,
    token_strs,
    unit_label,
    version_key,
)
from tl_plugins.checks import check_positive_int
from tl_plugins.ranking import top_k

FORMAT = 1
BASES = ("readout", "embed")
_LOADED: "weakref.WeakKeyDictionary[Any, tuple[tuple, ValueIndex]]" = weakref.WeakKeyDictionary()


class IndexRebuiltWarning(UserWarning):
    """An index file was missing, stale or corrupt and was rebuilt."""


def index_dir() -> Path:
    from tl_plugins.models.cache import cache_dir

    return cache_dir() / "debugger-index"


def _basis(dw: Any, basis: str) -> torch.Tensor:
    if basis not in BASES:
        raise ValueError(f"basis: got {basis!r}; accepted: {', '.join(BASES)}")
    return dw.readout_basis() if basis == "readout" else dw.W_E.T.contiguous()


def _vectors(dw: Any, heads: bool) -> list[tuple[str, int, torch.Tensor]]:
    out = [("ffn", l, dw.W_out[l]) for l in range(dw.n_layers)]
    if heads:  # every row of W_O: [H * d_head, d] per layer
        out += [("head", l, dw.W_O[l].reshape(-1, dw.W_O.shape[-1])) for l in range(dw.n_layers)]
    return out


def weights_hash(model: Any, basis: str = "readout", heads: bool = False) -> str:
    dw = debug_weights(model)
    h = hashlib.blake2b(digest_size=20)
    h.update(f"format={FORMAT};basis={basis};heads={heads};".encode())
    for t in [dw.W_out, _basis(dw, basis)] + ([dw.W_O] if heads else []):
        t = t.contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Block:
    top_vals: np.ndarray
    top_ids: np.ndarray
    bot_vals: np.ndarray
    bot_ids: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    norm: np.ndarray


_COLS = ("top_vals", "top_ids", "bot_vals", "bot_ids", "mean", "std", "norm")
_DTYPES = {"top_vals": np.float32, "top_ids": np.int32, "bot_vals": np.float32, "bot_ids": np.int32,
           "mean": np.float32, "std": np.float32, "norm": np.float32}


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=30)
    con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    con.execute("CREATE TABLE IF NOT EXISTS blocks (kind TEXT, layer INTEGER, rows INTEGER, "
                + ", ".join(f"{c} BLOB" for c in _COLS) + ", PRIMARY KEY (kind, layer))")
    return con


def _checksum(blocks: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(blocks):
        for c in _COLS:
            h.update(np.ascontiguousarray(getattr(blocks[key], c)).tobytes())
    return h.hexdigest()


class ValueIndex:
    """Top/bottom tokens of every value (and optionally every W_O row), with exact search.

    Build or load with :meth:`build` / :meth:`load`; both return an index bound to the model's
    weights (``check_model`` refuses a model whose weights changed since)."""

    def __init__(self, *, path: Path, meta: dict, blocks: dict, model: Any):
        self.path = path
        self.meta = meta
        self.blocks = blocks
        self._key = version_key(model)
        dw = debug_weights(model)
        self._backend = dw.backend
        self._dw = dw
        self.basis_name = meta["basis"]
        self._B = _basis(dw, self.basis_name)
        self._V = dw.W_out.reshape(-1, dw.W_out.shape[-1])
        self._mean = torch.from_numpy(np.concatenate([blocks[("ffn", l)].mean for l in range(dw.n_layers)]))
        self._std = torch.from_numpy(np.concatenate([blocks[("ffn", l)].std for l in range(dw.n_layers)]))
        self._clusters: dict = {}

    # -- facts --------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def d_mlp(self) -> int:
        return int(self.meta["d_mlp"])

    @property
    def n_values(self) -> int:
        return self.n_layers * self.d_mlp

    def __repr__(self) -> str:
        return (f"ValueIndex({self.n_values} values, top/bottom {self.n_tokens} tokens, basis="
                f"{self.basis_name}, heads={self.meta['heads']}, {self.path})")

    def check_model(self, model: Any) -> None:
        if version_key(model) != self._key or debug_weights(model) is not self._dw:
            raise ValueError("index: built for other weights than this model's (the weights changed or it "
                             "is another model); accepted: ValueIndex.load(model) for this model")

    # -- building and loading -----------------------------------------------------------------
    @classmethod
    def path_for(cls, model: Any, *, basis: str = "readout", heads: bool = False, n_tokens: int = 30,
                 folder: Optional[Path] = None) -> tuple[Path, str]:
        h = weights_hash(model, basis, heads)
        folder = Path(folder) if folder is not None else index_dir()
        return folder / f"values-{h[:24]}-{basis}-n{int(n_tokens)}{'-heads' if heads else ''}.sqlite", h

    @classmethod
    def build(cls, model: Any, *, n_tokens: int = 30, basis: str = "readout", heads: bool = False,
              folder: Optional[Path] = None, budget_bytes: int = 128 * 2**20, progress: bool = True,
              progress_fn=None, ctx: Any = None) -> "ValueIndex":
        """Compute and store the index (resuming a ``.partial`` file of the same weights).

        ctx: the ranks to share the blocks with (default :func:`tl_plugins.distributed.current`: one
        process unless a process group is initialised); every rank returns the finished index."""
        from tl_plugins import distributed

        check_positive_int(n_tokens, "n_tokens")
        ctx = distributed.current() if ctx is None else ctx
        if ctx.distributed:
            return cls._build_sharded(model, n_tokens=n_tokens, basis=basis, heads=heads, folder=folder,
                                      budget_bytes=budget_bytes, progress=progress, ctx=ctx)
        dw = debug_weights(model)
        path, h = cls.path_for(model, basis=basis, heads=heads, n_tokens=n_tokens, folder=folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        B = _basis(dw, basis)
        meta = _index_meta(dw, h, basis=basis, n_tokens=n_tokens, heads=heads)
        con = _open_partial(partial, meta)
        done = {(k, l) for k, l in con.execute("SELECT kind, layer FROM blocks").fetchall()}
        items = _vectors(dw, heads)
        total = sum(v.shape[0] for kind, l, v in items if (kind, l) not in done)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="value index", unit="value", leave=False)
        seen = [0]

        def tick(nrows):
            seen[0] += nrows
            if bar is not None:
                bar.update(nrows)
            if progress_fn is not None:
                progress_fn(seen[0], total)

        try:
            for kind, l, V in items:
                if (kind, l) in done:
                    continue
                _insert(con, (kind, l, V.shape[0], *_block_blobs(V, B, n_tokens, budget_bytes, tick)))
                con.commit()
        finally:
            if bar is not None:
                bar.close()
        blocks = _finish(con, partial, path, meta)
        index = cls(path=path, meta=meta, blocks=blocks, model=model)
        _LOADED[model] = (version_key(model), index)
        return index

    @classmethod
    def _build_sharded(cls, model: Any, *, n_tokens: int, basis: str, heads: bool, folder: Optional[Path],
                       budget_bytes: int, progress: bool, ctx: Any) -> "ValueIndex":
        """:meth:`build` split over ranks: shards per rank, rank 0 merges in the one-process order."""
        from tl_plugins import distributed

        dw = debug_weights(model)
        path, h = cls.path_for(model, basis=basis, heads=heads, n_tokens=n_tokens, folder=folder)
        partial = path.with_name(path.name + ".partial")
        B = _basis(dw, basis)
        meta = _index_meta(dw, h, basis=basis, n_tokens=n_tokens, heads=heads)
        items = _vectors(dw, heads)
        distributed.agree({**meta, "path": str(path)}, ctx)
        distributed.checked(lambda: path.parent.mkdir(parents=True, exist_ok=True), ctx)
        mine = distributed.split(items, ctx.rank, ctx.world_size, [v.shape[0] for _, _, v in items])
        shard = path.with_name(f"{path.name}.rank{ctx.rank:05d}-of{ctx.world_size:05d}.partial")

        def work():
            done = _done_blocks(path, meta)  # finished by any rank of any earlier run, or merged already
            con = _open_partial(shard, meta)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=sum(v.shape[0] for _, _, v in mine), unit="value", leave=False,
                           desc=f"value index [rank {ctx.rank}/{ctx.world_size}]", position=ctx.local_rank)
            try:
                for kind, l, V in mine:
                    if (kind, l) not in done:
                        _insert(con, (kind, l, V.shape[0], *_block_blobs(V, B, n_tokens, budget_bytes,
                                                                         bar.update if bar else None)))
                        con.commit()
                        distributed.unit_done("value index", distributed.unit_key([kind, l]), ctx)
                    elif bar is not None:
                        bar.update(V.shape[0])
            finally:
                con.close()
                if bar is not None:
                    bar.close()

        distributed.checked(work, ctx)
        distributed.barrier(ctx)  # every block is in some shard after this

        def merge():
            done = _done_blocks(path, meta)
            con = _open_partial(partial, meta)
            have = {(k, l) for k, l in con.execute("SELECT kind, layer FROM blocks").fetchall()}
            for kind, l, _ in items:  # the one-process order, one transaction per block
                if (kind, l) in have:
                    continue
                src = sqlite3.connect(f"file:{done[(kind, l)]}?mode=ro", uri=True)
                row = src.execute(f"SELECT kind, layer, rows, {', '.join(_COLS)} FROM blocks WHERE kind = ? "
                                  "AND layer = ?", (kind, l)).fetchone()
                src.close()
                _insert(con, row)
                con.commit()
            _finish(con, partial, path, meta)
            for f in _shard_files(path):
                f.unlink(missing_ok=True)

        distributed.checked(merge if ctx.is_main else (lambda: None), ctx)
        return cls._read(model, path, h, basis=basis, heads=heads, n_tokens=n_tokens)

    @classmethod
    def load(cls, model: Any, *, n_tokens: int = 30, basis: str = "readout", heads: bool = False,
             folder: Optional[Path] = None, rebuild: bool = True, **build_options: Any) -> "ValueIndex":
        """The index for this model's current weights: read and verified, or (re)built when it is
        missing, stale or corrupt (``rebuild=False``: raise instead)."""
        path, h = cls.path_for(model, basis=basis, heads=heads, n_tokens=n_tokens, folder=folder)
        problem = None
        if path.exists():
            try:
                return cls._read(model, path, h, basis=basis, heads=heads, n_tokens=n_tokens)
            except (ValueError, sqlite3.DatabaseError, KeyError, json.JSONDecodeError) as exc:
                problem = f"the index file {path} is corrupt or stale ({exc})"
        else:
            problem = f"no index at {path}"
        if not rebuild:
            raise FileNotFoundError(problem + "; build it with ValueIndex.build(model)")
        if path.exists():
            warnings.warn(problem + "; rebuilding it", IndexRebuiltWarning, stacklevel=2)
            path.unlink()
        return cls.build(model, n_tokens=n_tokens, basis=basis, heads=heads, folder=folder, **build_options)

    @classmethod
    def cached(cls, model: Any) -> Optional["ValueIndex"]:
        """The index last built or loaded for this model in this process, if its weights are unchanged."""
        hit = _LOADED.get(model)
        if hit is not None and hit[0] == version_key(model):
            return hit[1]
        return None

    @classmethod
    def _read(cls, model, path, h, *, basis, heads, n_tokens) -> "ValueIndex":
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            ok = con.execute("PRAGMA quick_check").fetchone()
            if not ok or ok[0] != "ok":
                raise ValueError(f"sqlite quick_check: {ok}")
            stored = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if stored.get("complete") != "1":
                raise ValueError("the build did not finish")
            meta = json.loads(stored["meta"])
            dw = debug_weights(model)
            expect = {"format": FORMAT, "weights_hash": h, "basis": basis, "n_tokens": n_tokens,
                      "n_layers": dw.n_layers, "d_mlp": dw.d_mlp, "d_vocab": dw.d_vocab, "heads": heads}
            for key, val in expect.items():
                if meta.get(key) != val:
                    raise ValueError(f"meta {key}: stored {meta.get(key)!r}, expected {val!r}")
            blocks = _read_blocks(con, meta)
            if _checksum(blocks) != stored.get("checksum"):
                raise ValueError("content checksum mismatch")
        finally:
            con.close()
        index = cls(path=path, meta=meta, blocks=blocks, model=model)
        _LOADED[model] = (version_key(model), index)
        return index

    # -- reading --------------------------------------------------------------------------------
    def _check_unit(self, layer: Any, unit: Any) -> tuple[int, int]:
        from tl_embedspace.debugger.model import check_unit

        return check_unit(self._backend, layer, unit)

    def promoted(self, layer: int, unit: int, coefficient: float = 1.0, n: Optional[int] = None) -> list[int]:
        """Token ids the sub-update ``coefficient * v`` promotes most (bottom tokens when it is negative)."""
        blk = self.blocks[("ffn", int(layer))]
        ids = blk.top_ids if coefficient >= 0 else blk.bot_ids
        return ids[int(unit), : (n or self.n_tokens)].tolist()

    def value(self, layer: Any, unit: Any, n: Optional[int] = None) -> dict:
        """A value's details: norm, top and bottom tokens with their scores, mean and std of its scores."""
        layer, unit = self._check_unit(layer, unit)
        blk = self.blocks[("ffn", layer)]
        n = min(n or self.n_tokens, self.n_tokens)
        strs = token_strs(self._backend, blk.top_ids[unit, :n].tolist() + blk.bot_ids[unit, :n].tolist())
        return {"layer": layer, "unit": unit, "label": unit_label(layer, unit), "norm": float(blk.norm[unit]),
                "basis": self.basis_name, "mean": float(blk.mean[unit]), "std": float(blk.std[unit]),
                "top": [{"token": s, "id": int(i), "score": float(v)} for s, i, v in
                        zip(strs[:n], blk.top_ids[unit, :n], blk.top_vals[unit, :n])],
                "bottom": [{"token": s, "id": int(i), "score": float(v)} for s, i, v in
                           zip(strs[n:], blk.bot_ids[unit, :n], blk.bot_vals[unit, :n])]}

    def to_frame(self) -> pd.DataFrame:
        """One row per value: layer, unit, norm, top tokens (strings)."""
        rows = []
        for l in range(self.n_layers):
            blk = self.blocks[("ffn", l)]
            for u in range(self.d_mlp):
                rows.append({"layer": l, "unit": u, "norm": float(blk.norm[u]),
                             "top_ids": blk.top_ids[u].tolist()})
        return pd.DataFrame(rows)

    def _frame(self, flat: torch.Tensor, score: torch.Tensor, extra: dict) -> pd.DataFrame:
        layer, unit = flat // self.d_mlp, flat % self.d_mlp
        df = pd.DataFrame({"layer": layer.numpy(), "unit": unit.numpy(), "score": score.numpy(),
                           **{k: v.numpy() for k, v in extra.items()}})
        df.insert(2, "label", [unit_label(l, u) for l, u in zip(df.layer, df.unit)])
        return df

    def search(self, tokens: Any, k: int = 20, *, standardize: bool = True,
               layers: Optional[Sequence[int]] = None) -> pd.DataFrame:
        """Values ranked by how strongly they promote ``tokens`` (strings, each one token, or ids):
        score = mean over the tokens of ``(v . B[:, t] - mean_v) / std_v`` (``standardize=False``: the
        raw ``v . B[:, t]``). Exact for every value. Columns ``layer, unit, label, score, raw``."""
        ids = resolve_tokens(self._backend, tokens, "tokens")
        k = _pos_int(k, "k")
        raw = (self._V @ self._B[:, ids]).mean(1)
        score = (raw - self._mean) / self._std.clamp_min(1e-12) if standardize else raw
        if layers is not None:
            keep = torch.zeros(self.n_layers, dtype=torch.bool)
            for l in layers:
                keep[self._backend.check_layer(l, "layers")] = True
            score = torch.where(keep.repeat_interleave(self.d_mlp), score, torch.tensor(float("-inf")))
        top = core.ranked(score, k)
        return self._frame(top, score[top], {"raw": raw[top]})

    def concept(self, tokens: Any, k: int = 20, *, n: Optional[int] = None) -> pd.DataFrame:
        """Concept search by enrichment: how over-represented the token set is among each value's
        top-``n`` tokens (default all stored), scored by -log10 of the hypergeometric tail p-value.
        Columns ``layer, unit, label, score, hits, expected, enrichment, p_value``."""
        from scipy.stats import hypergeom

        ids = sorted(set(resolve_tokens(self._backend, tokens, "tokens")))
        n = min(n or self.n_tokens, self.n_tokens)
        k = _pos_int(k, "k")
        top = np.concatenate([self.blocks[("ffn", l)].top_ids[:, :n] for l in range(self.n_layers)])
        hits = torch.from_numpy(np.isin(top, np.array(ids)).sum(1))
        V = int(self.meta["d_vocab"])
        pv = torch.from_numpy(hypergeom.sf(hits.numpy() - 1, V, len(ids), n))
        score = -torch.log10(pv.clamp_min(1e-300)).float()
        score = torch.where(hits > 0, score, torch.zeros_like(score))
        order = core.ranked(score + hits.float() * 1e-6, k)
        expected = len(ids) * n / V
        return self._frame(order, score[order], {"hits": hits[order], "expected": torch.full((len(order),), expected),
                                                "enrichment": hits[order].float() / expected,
                                                "p_value": pv[order]})

    def cluster(self, n_clusters: int = 64, *, iters: int = 25, seed: int = 0, n_top: int = 10) -> "Clusters":
        """Spherical k-means of all values by their cosine in vocabulary space (``v @ (B B^T)^1/2``
        has the same dot products as ``v @ B``), O(N * n_clusters * d) per iteration."""
        key = (n_clusters, iters, seed)
        if key not in self._clusters:
            X = self._V @ core.gram_root(self._B)
            labels, cent, sims = core.spherical_kmeans(X, n_clusters, iters=iters, seed=seed)
            # a centroid in vocabulary space: the mean of its members' (unit) vectors
            tops = []
            for c in range(n_clusters):
                members = (labels == c).nonzero().flatten()
                v = (self._V[members] / self._V[members].norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(0) \
                    if members.numel() else torch.zeros(self._V.shape[1])
                tops.append(token_strs(self._backend, top_k(v @ self._B, n_top)[1].tolist()))
            self._clusters[key] = Clusters(labels=labels, cosine=sims, top_tokens=tops, d_mlp=self.d_mlp)
        return self._clusters[key]


@dataclass
class Clusters:
    labels: torch.Tensor
    cosine: torch.Tensor
    top_tokens: list
    d_mlp: int

    def to_frame(self) -> pd.DataFrame:
        n = self.labels.numel()
        flat = torch.arange(n)
        return pd.DataFrame({"layer": (flat // self.d_mlp).numpy(), "unit": (flat % self.d_mlp).numpy(),
                             "cluster": self.labels.numpy(), "cosine": self.cosine.numpy()})

    def summary(self) -> pd.DataFrame:
        df = self.to_frame()
        g = df.groupby("cluster").agg(size=("unit", "size"), mean_layer=("layer", "mean"),
                                      cosine=("cosine", "mean")).reset_index()
        g["top_tokens"] = [self.top_tokens[c] for c in g.cluster]
        return g.sort_values("size", ascending=False).reset_index(drop=True)


def _block_blobs(V: torch.Tensor, B: torch.Tensor, n_tokens: int, budget_bytes: int, tick) -> list[bytes]:
    """The stored columns of one block of value vectors V [n, d_model] in basis B [d_model, d_vocab]."""
    tv, ti, bv, bi = core.two_sided_topk(V, B, n_tokens, budget_bytes=budget_bytes, progress=tick)
    mean, std = core.score_moments(V, B)
    blk = _Block(tv.numpy(), ti.numpy().astype(np.int32), bv.numpy(), bi.numpy().astype(np.int32),
                 mean.numpy(), std.numpy(), V.norm(dim=1).numpy())
    return [np.ascontiguousarray(getattr(blk, c), _DTYPES[c]).tobytes() for c in _COLS]


def _insert(con: sqlite3.Connection, row: Sequence) -> None:
    con.execute(f"INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, {', '.join('?' * len(_COLS))})", tuple(row))


def _index_meta(dw: Any, weights_hash: str, *, basis: str, n_tokens: int, heads: bool) -> dict:
    """What an index file records about how it was built (compared on load and on resume)."""
    return {"format": FORMAT, "weights_hash": weights_hash, "basis": basis, "n_tokens": n_tokens,
            "n_layers": dw.n_layers, "d_mlp": dw.d_mlp, "d_vocab": dw.d_vocab, "heads": heads,
            "weights": dw.processing}


def _finish(con: sqlite3.Connection, partial: Path, path: Path, meta: dict) -> dict:
    """Seal a partial file that holds every block (checksum, complete flag) and move it to ``path``;
    the blocks it holds."""
    blocks = _read_blocks(con, meta)
    con.execute("INSERT OR REPLACE INTO meta VALUES ('checksum', ?)", (_checksum(blocks),))
    con.execute("INSERT OR REPLACE INTO meta VALUES ('complete', '1')")
    con.commit()
    con.close()
    os.replace(partial, path)
    return blocks


def _open_partial(path: Path, meta: dict) -> sqlite3.Connection:
    """A partial index file for ``meta``: reused when it holds the same meta, else started afresh."""
    con = None
    try:
        con = _connect(path)
        stored = dict(con.execute("SELECT key, value FROM meta").fetchall())
        if stored and json.loads(stored.get("meta", "{}")) != meta:
            con.close()
            path.unlink()
            con = _connect(path)
    except sqlite3.DatabaseError:
        if con is not None:
            con.close()
        path.unlink(missing_ok=True)
        con = _connect(path)
    con.execute("INSERT OR REPLACE INTO meta VALUES ('meta', ?)", (json.dumps(meta),))
    con.commit()
    return con


def _shard_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".rank*-of*.partial"))


def _done_blocks(path: Path, meta: dict) -> dict:
    """(kind, layer) -> the partial file (a rank's shard or the merge file) that holds that block, for
    every partial file of this meta; files of other weights or unreadable ones count for nothing."""
    done: dict = {}
    for f in [path.with_name(path.name + ".partial"), *_shard_files(path)]:
        if not f.exists():
            continue
        try:
            con = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
            try:
                stored = dict(con.execute("SELECT key, value FROM meta").fetchall())
                if json.loads(stored.get("meta", "{}")) != meta:
                    continue
                for k, l in con.execute("SELECT kind, layer FROM blocks").fetchall():
                    done.setdefault((k, int(l)), f)
            finally:
                con.close()
        except (sqlite3.DatabaseError, ValueError):
            continue
    return done


def _pos_int(v: Any, arg: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{arg}: got {v!r}; accepted: a positive int")
    return v


def _read_blocks(con: sqlite3.Connection, meta: dict) -> dict:
    blocks = {}
    n = int(meta["n_tokens"])
    expected = [("ffn", l) for l in range(int(meta["n_layers"]))]
    for row in con.execute(f"SELECT kind, layer, rows, {', '.join(_COLS)} FROM blocks"):
        kind, layer, rows = row[0], int(row[1]), int(row[2])
        arrs = {}
        for c, blob in zip(_COLS, row[3:]):
            a = np.frombuffer(blob, dtype=_DTYPES[c])
            width = n if c in ("top_vals", "top_ids", "bot_vals", "bot_ids") else 1
            if a.size != rows * width:
                raise ValueError(f"block ({kind}, {layer}) column {c}: {a.size} entries, expected {rows * width}")
            arrs[c] = a.reshape(rows, n) if width > 1 else a
        if not all(np.isfinite(arrs[c]).all() for c in ("top_vals", "bot_vals", "mean", "std", "norm")):
            raise ValueError(f"block ({kind}, {layer}) has non-finite entries")
        if (arrs["top_ids"].min(initial=0) < 0) or (arrs["top_ids"].max(initial=0) >= int(meta["d_vocab"])):
            raise ValueError(f"block ({kind}, {layer}) has token ids out of range")
        blocks[(kind, layer)] = _Block(**arrs)
    missing = [e for e in expected if e not in blocks]
    if missing:
        raise ValueError(f"blocks missing: {missing[:3]}")
    if int(meta["d_mlp"]) != blocks[("ffn", 0)].norm.size:
        raise ValueError("block size does not match d_mlp")
    return blocks
