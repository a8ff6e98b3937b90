"""``EmbeddingSpace``: every weight of a TransformerLens model read in vocabulary space (Dar et al. 2023).

    space = EmbeddingSpace(model)                   # bases "paper" on tied models, else "full-circuit"
    space.ff_value(18, 42).to_frame()               # tokens a neuron promotes / suppresses
    ov = space.ov(18, 6)                            # vocab x vocab view, never materialised
    ov.topk_pairs(100)                              # exact top-100 (source, output) token pairs
    ov.copying_score(), ov.top1_diag_accuracy()
    space.find_neurons(" Paris"), space.find_heads(" the", " the")

Bases (see docs/embedspace.md). A *read* basis ``R [d_vocab, d_model]`` gives the residual vector of
each token as seen by components that read the stream (W_Q, W_K, W_V, W_in, W_gate); a *write* basis
``W [d_model, d_vocab]`` reads out what components write (W_O, W_out):

    read_basis   "paper": W_U^T (tied models only)  "unembed": W_U^T  "full-circuit": W_E  "pinv": pinv(W_U)
    write_basis  "paper": W_U   (tied models only)  "unembed": W_U    "full-circuit": W_U  "pinv": pinv(W_E)

OV of head (l, h) = ``R W_V W_O W``, rows source tokens, columns output tokens; QK = ``R W_Q W_K^T R^T``,
rows query tokens, columns key tokens. Layer norms, biases, positions and 1/sqrt(d_head) are
ignored, as in the paper. ``ln="raw"`` reads the weights as stored and warns when the loader
processed them (folding/centering change W_E and W_U, so results no longer match the paper);
``ln="as_loaded"`` reads them as stored without the warning.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Union

import torch
from jaxtyping import Complex, Float, Int

import tl_plugins
from tl_embedspace import factored_topk as _topk
from tl_embedspace.filters import describe
from tl_embedspace.projections import (
    EmptyFilterError,
    FilterLike,
    build_filter,
    copying_score_from_eigenvalues,
    from_visible,
    read_scores,
    top_bottom,
    visible,
    write_scores,
)
from tl_embedspace.results import ComponentHits, RowTopk, TokenPairs, TokenScores
from tl_plugins.checks import check_index, check_positive_int, is_int
from tl_plugins.errors import UnsupportedModelError

READ_BASES = ("paper", "unembed", "full-circuit", "pinv")
WRITE_BASES = ("paper", "unembed", "full-circuit", "pinv")
LN_MODES = ("raw", "as_loaded")

Token = Union[int, str]


class ProcessedWeightsWarning(UserWarning):
    """The model's weights were processed (fold_ln/centering): results differ from the paper's."""


class _cached_on_weights:
    """Like ``functools.cached_property``, but recomputed when the model's weights change.

    The key is every parameter's storage address and PyTorch version counter, so in-place edits
    (``with torch.no_grad(): W[...] = ...``, ``copy_``) and replaced parameters are noticed; an edit
    through ``.data`` bypasses the version counter and is not (call ``space.refresh()`` then).
    """

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        key = obj._weights_key()
        store = obj.__dict__.setdefault("_weight_cache", {})
        hit = store.get(self.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        if obj.__dict__.get("_weights_seen") != key:  # the weights changed since the view was made
            obj._check_finite()
            obj.w = tl_plugins.weights(obj.model)
            obj.__dict__["_weights_seen"] = key
            store.clear()
        value = self.fn(obj)
        store[self.name] = (key, value)
        return value


class EmbeddingSpace:
    """Vocabulary-space view of one model's weights (see the module docstring).

    Args:
        model: a HookedTransformer (or anything ``tl_plugins.weights`` accepts).
        read_basis, write_basis: one of "paper", "unembed", "full-circuit", "pinv", or "auto"
            ("paper" when the embeddings are tied, else "full-circuit").
        ln: "raw" or "as_loaded" (see the module docstring).
        filters: token filter applied to every top-k by default (name, ids, mask, predicate, list).
        budget_bytes: memory for one chunk of a vocab x vocab product (default 256 MB).
        tokenizer: overrides ``model.tokenizer``.
    """

    def __init__(self, model: Any, read_basis: str = "auto", write_basis: str = "auto", ln: str = "raw",
                 filters: FilterLike = None, budget_bytes: int = _topk.DEFAULT_BUDGET_BYTES,
                 tokenizer: Any = None):
        cfg = getattr(model, "cfg", None)
        if cfg is None:
            raise UnsupportedModelError(f"model: {type(model).__name__} has no .cfg; accepted: a TransformerLens model")
        if getattr(cfg, "num_experts", None):
            raise UnsupportedModelError(
                f"model: mixture-of-experts models (cfg.num_experts={cfg.num_experts}) are not supported: "
                "their feed-forward weights are per expert and routed, which this package does not model")
        if ln not in LN_MODES:
            raise ValueError(f"ln: got {ln!r}; accepted: one of {', '.join(LN_MODES)}")
        check_positive_int(budget_bytes, "budget_bytes")
        self.model = model
        self._check_finite()
        self.w = tl_plugins.weights(model)
        self._weights_seen = self._weights_key()
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.ln = ln
        self.budget_bytes = budget_bytes
        tied = self.w.tied
        self.read_basis = self._resolve(read_basis, READ_BASES, "read_basis", tied)
        self.write_basis = self._resolve(write_basis, WRITE_BASES, "write_basis", tied)
        if ln == "raw" and self.w.processing.is_processed:
            warnings.warn(
                f"ln='raw': the model's weights were processed ({self.w.processing.describe()}); "
                "W_E/W_U/W_in differ from the checkpoint's, so projections will not match the paper. "
                "Load unprocessed weights, or pass ln='as_loaded' to accept them as they are.",
                ProcessedWeightsWarning, stacklevel=2)
        self.filter_spec = filters
        self.filter_ids = build_filter(filters, self.d_vocab, self._token_strings_fn())

    # -- freshness -----------------------------------------------------------------------------
    def _weights_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _check_finite(self) -> None:
        """Refuse non-finite weights: top-k over NaN scores is undefined (fewer results, eigh errors)."""
        for name, p in self.model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise ValueError(f"model: parameter {name} holds NaN or infinite values; accepted: finite "
                                 "weights (vocabulary-space rankings of NaN are undefined)")

    def refresh(self) -> None:
        """Forget every basis and stack computed from the weights (after edits through ``.data``)."""
        self._check_finite()
        self.__dict__.pop("_weight_cache", None)
        self.w = tl_plugins.weights(self.model)
        self._weights_seen = self._weights_key()

    # -- configuration -------------------------------------------------------------------------
    @staticmethod
    def _resolve(name: str, allowed: Sequence[str], arg: str, tied: bool) -> str:
        if name == "auto":
            return "paper" if tied else "full-circuit"
        if name not in allowed:
            raise ValueError(f"{arg}: got {name!r}; accepted: 'auto' or one of {', '.join(allowed)}")
        if name == "paper" and not tied:
            raise UnsupportedModelError(
                f"{arg}: 'paper' uses one embedding matrix E for both sides and needs tied embeddings "
                "(W_U == W_E^T), but this model's are untied or were centred apart; use 'full-circuit' "
                "(W_E in, W_U out), 'unembed' (W_U^T in, W_U out) or 'pinv'")
        return name

    @property
    def basis(self) -> dict:
        """What every result records: the two bases, the layer-norm mode and the weight processing."""
        n = None if self.filter_ids is None else int(self.filter_ids.numel())
        return {"read_basis": self.read_basis, "write_basis": self.write_basis, "ln": self.ln,
                "weights": self.w.processing.describe(), "filter": describe(self.filter_spec, n)}

    @property
    def d_vocab(self) -> int:
        return self.w.d_vocab

    @property
    def n_layers(self) -> int:
        return self.w.n_layers

    @property
    def n_heads(self) -> int:
        return self.w.n_heads

    @_cached_on_weights
    def R(self) -> torch.Tensor:
        """Read basis ``[d_vocab, d_model]``: row t is token t's residual vector as components read it."""
        if self.read_basis in ("paper", "unembed"):
            return self.w.W_U.T.contiguous()
        if self.read_basis == "full-circuit":
            return self.w.W_E
        return torch.linalg.pinv(self.w.W_U.double()).to(self.w.W_U.dtype)  # [d_vocab, d_model]

    @_cached_on_weights
    def W(self) -> torch.Tensor:
        """Write basis ``[d_model, d_vocab]``: ``v @ W`` are the token scores of a written vector v."""
        if self.write_basis in ("paper", "unembed", "full-circuit"):
            return self.w.W_U
        return torch.linalg.pinv(self.w.W_E.double()).to(self.w.W_E.dtype)  # [d_model, d_vocab]

    @_cached_on_weights
    def W_T(self) -> torch.Tensor:
        """``W^T`` contiguous ``[d_vocab, d_model]`` (one token's write direction is a row)."""
        if self.read_basis in ("paper", "unembed") and self.write_basis in ("paper", "unembed", "full-circuit"):
            return self.R  # the same matrix, W_U^T
        return self.W.T.contiguous()

    # -- tokens --------------------------------------------------------------------------------
    def _token_strings_fn(self):
        return (lambda: self.token_strings) if self.tokenizer is not None else None

    @cached_property
    def token_strings(self) -> list[str]:
        """Decoded string of every token id (raw, without visible-space marks)."""
        if self.tokenizer is None:
            return [f"<{i}>" for i in range(self.d_vocab)]
        out = self.tokenizer.batch_decode([[i] for i in range(self.d_vocab)])
        return list(out) + [f"<{i}>" for i in range(len(out), self.d_vocab)]

    def token_str(self, token_id: int) -> str:
        """Token string with visible spaces ("\u2423the"); "<id>" when there is no tokenizer."""
        return visible(self.token_strings[int(token_id)])

    def to_id(self, token: Token, arg: str = "token") -> int:
        """A token id from an id or a string that is exactly one token (visible spaces allowed)."""
        if isinstance(token, torch.Tensor) and token.numel() == 1:
            token = int(token)
        if is_int(token):
            if not 0 <= token < self.d_vocab:
                raise IndexError(f"{arg}: id {token} is not in the vocabulary; accepted: ids in [0, {self.d_vocab - 1}]")
            return token
        if isinstance(token, str):
            if self.tokenizer is None:
                if token.startswith("<") and token.endswith(">") and token[1:-1].isdigit():
                    return self.to_id(int(token[1:-1]), arg)
                raise ValueError(f"{arg}: {token!r} is a string but the model has no tokenizer; pass an id "
                                 f"in [0, {self.d_vocab - 1}]")
            text = from_visible(token)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                pieces = [visible(self.tokenizer.decode([i])) for i in ids]
                raise ValueError(f"{arg}: {token!r} is not a single token of the vocabulary (it tokenises to "
                                 f"{pieces}); accepted: an id or a string that is exactly one token")
            return int(ids[0])
        raise TypeError(f"{arg}: got {token!r} of type {type(token).__name__}; accepted: an int id or a str")

    def to_ids(self, tokens: Any, arg: str = "tokens") -> Int[torch.Tensor, " n"] | None:
        """Ids of a token collection (ids, strings, a bool mask or a filter spec); None stays None."""
        if tokens is None:
            return None
        if isinstance(tokens, (list, tuple)) and tokens and any(isinstance(t, str) for t in tokens):
            if all(isinstance(t, str) and t not in ("ascii", "alnum", "alpha", "words") for t in tokens):
                return torch.tensor(sorted({self.to_id(t, arg) for t in tokens}), dtype=torch.long)
        if isinstance(tokens, (int, str)) and not (isinstance(tokens, str) and tokens in
                                                    ("ascii", "alnum", "alpha", "words")):
            return torch.tensor([self.to_id(tokens, arg)])
        try:
            return build_filter(tokens, self.d_vocab, self._token_strings_fn())
        except (ValueError, IndexError) as exc:
            raise type(exc)(f"{arg}: {exc}") from None

    def candidate_ids(self, ids: Any, arg: str) -> Int[torch.Tensor, " n"] | None:
        """Explicit ids, else the space-wide filter."""
        got = self.to_ids(ids, arg)
        return got if got is not None else self.filter_ids

    # -- range checks --------------------------------------------------------------------------
    def check_layer(self, layer: Any) -> int:
        return check_index(layer, self.n_layers, "layer")

    def _head(self, head: Any) -> int:
        return check_index(head, self.n_heads, "head")

    def _neuron(self, neuron: Any) -> int:
        if self.w.d_mlp is None:
            raise UnsupportedModelError("model: attention-only model has no feed-forward neurons")
        return check_index(neuron, self.w.d_mlp, "neuron")

    # -- vectors to tokens ---------------------------------------------------------------------
    def token_scores(self, scores: Float[torch.Tensor, " d_vocab"], k: int, label: str, tokens: Any = None
                     ) -> TokenScores:
        ids = self.candidate_ids(tokens, "tokens")
        tv, ti, bv, bi = top_bottom(scores, k, ids)
        return TokenScores(label, ti, tv, [self.token_str(i) for i in ti.tolist()], bi, bv,
                           [self.token_str(i) for i in bi.tolist()], dict(self.basis))

    def project(self, vector: Float[torch.Tensor, " d_model"], k: int = 10, *, side: str = "write", label: str = "vector",
                tokens: Any = None) -> TokenScores:
        """Top/bottom-k tokens of any direction ``vector [d_model]`` (a steering vector, an SAE
        decoder row (side="write"), an SAE encoder column or probe (side="read"), a weight difference).
        """
        if side not in ("write", "read"):
            raise ValueError(f"side: got {side!r}; accepted: 'write' (v @ W) or 'read' (R @ v)")
        v = torch.as_tensor(vector).detach().flatten()
        if v.numel() != self.w.d_model:
            raise ValueError(f"vector: has {v.numel()} entries; accepted: d_model = {self.w.d_model}")
        if not torch.isfinite(v).all():
            raise ValueError("vector: contains NaN or inf")
        scores = write_scores(v, self.W) if side == "write" else read_scores(v, self.R)
        return self.token_scores(scores, k, label, tokens)

    def ff_value(self, layer: int, neuron: int, k: int = 10, tokens: Any = None) -> TokenScores:
        """Tokens promoted/suppressed by neuron ``neuron``'s value vector ``W_out[layer, neuron] @ W``."""
        layer, neuron = self.check_layer(layer), self._neuron(neuron)
        v = self.w.W_out_layer(layer)[neuron]
        return self.token_scores(write_scores(v, self.W), k, f"L{layer}N{neuron} value", tokens)

    def ff_key(self, layer: int, neuron: int, k: int = 10, tokens: Any = None) -> TokenScores:
        """Tokens whose residual vector most drives the neuron's key ``R @ W_in[layer][:, neuron]``."""
        layer, neuron = self.check_layer(layer), self._neuron(neuron)
        v = self.w.W_in_layer(layer)[:, neuron]
        return self.token_scores(read_scores(v, self.R), k, f"L{layer}N{neuron} key", tokens)

    def ff_gate(self, layer: int, neuron: int, k: int = 10, tokens: Any = None) -> TokenScores:
        """Gated MLPs: tokens that most open the neuron's gate ``R @ W_gate[layer][:, neuron]``."""
        layer, neuron = self.check_layer(layer), self._neuron(neuron)
        if not self.w.gated_mlp:
            raise UnsupportedModelError("ff_gate: the model's MLP is not gated (cfg.gated_mlp=False); use ff_key")
        v = self.w.W_gate_layer(layer)[:, neuron]
        return self.token_scores(read_scores(v, self.R), k, f"L{layer}N{neuron} gate key", tokens)

    def head_vector(self, layer: int, head: int, which: str, index: int, k: int = 10,
                    tokens: Any = None) -> TokenScores:
        """Column ``index`` of W_Q/W_K/W_V (read side) or row ``index`` of W_O (write side) of a head."""
        layer, head = self.check_layer(layer), self._head(head)
        index = check_index(index, self.w.d_head, "index")
        which = str(which).upper()
        if which in ("Q", "K", "V"):
            mat = getattr(self.w, f"W_{which}_layer")(layer)[head]  # [d_model, d_head]
            return self.token_scores(read_scores(mat[:, index], self.R), k, f"L{layer}H{head} W_{which}[:, {index}]",
                                tokens)
        if which == "O":
            v = self.w.W_O_layer(layer)[head][index]
            return self.token_scores(write_scores(v, self.W), k, f"L{layer}H{head} W_O[{index}]", tokens)
        raise ValueError(f"which: got {which!r}; accepted: 'Q', 'K', 'V' or 'O'")

    def embedding(self, token: Token, k: int = 10, tokens: Any = None) -> TokenScores:
        """Token scores of an input embedding ``W_E[t] @ W`` (a written vector)."""
        t = self.to_id(token)
        return self.token_scores(write_scores(self.w.W_E[t], self.W), k, f"W_E[{self.token_str(t)}]", tokens)

    def unembedding(self, token: Token, k: int = 10, tokens: Any = None) -> TokenScores:
        """Token scores of an unembedding direction ``R @ W_U[:, t]`` (a read vector)."""
        t = self.to_id(token)
        return self.token_scores(read_scores(self.w.W_U[:, t], self.R), k, f"W_U[:, {self.token_str(t)}]", tokens)

    # -- vocab x vocab circuits -----------------------------------------------------------------
    def ov(self, layer: int, head: int) -> VocabMatrix:
        """OV circuit of a head in vocabulary space: ``R W_V W_O W`` (rows source, columns output)."""
        layer, head = self.check_layer(layer), self._head(head)
        A = self.R @ self.w.W_V_layer(layer)[head]
        B = (self.W_T @ self.w.W_O_layer(layer)[head].T).T  # [d_head, d_vocab], column-major
        return VocabMatrix(self, A, B, f"OV L{layer}H{head}", "ov", layer, head)

    def qk(self, layer: int, head: int) -> VocabMatrix:
        """QK circuit of a head in vocabulary space: ``R W_Q W_K^T R^T`` (rows query, columns key)."""
        layer, head = self.check_layer(layer), self._head(head)
        A = self.R @ self.w.W_Q_layer(layer)[head]
        B = (self.R @ self.w.W_K_layer(layer)[head]).T
        return VocabMatrix(self, A, B, f"QK L{layer}H{head}", "qk", layer, head)

    def matrix(self, A: Float[torch.Tensor, "d_vocab r"], B: Float[torch.Tensor, "r d_vocab"], label: str = "matrix"
               ) -> VocabMatrix:
        """Wrap any vocab x vocab product ``A [d_vocab, r] @ B [r, d_vocab]`` (e.g. W_E @ W_U)."""
        return VocabMatrix(self, A, B, label, "custom", None, None)

    # -- search across the whole model ---------------------------------------------------------
    @_cached_on_weights
    def _values_flat(self) -> torch.Tensor:
        """Every feed-forward value vector, ``[n_layers * d_mlp, d_model]``."""
        if self.w.d_mlp is None:
            raise UnsupportedModelError("model: attention-only model has no feed-forward neurons")
        return self.w.W_out.reshape(-1, self.w.d_model).contiguous()

    @_cached_on_weights
    def _keys_flat(self) -> torch.Tensor:
        if self.w.d_mlp is None:
            raise UnsupportedModelError("model: attention-only model has no feed-forward neurons")
        return self.w.W_in.transpose(1, 2).reshape(-1, self.w.d_model).contiguous()

    @_cached_on_weights
    def _gates_flat(self) -> torch.Tensor:
        if not self.w.gated_mlp:
            raise UnsupportedModelError("kind: 'gate' needs a gated MLP (cfg.gated_mlp=True)")
        return self.w.W_gate.transpose(1, 2).reshape(-1, self.w.d_model).contiguous()

    def find_neurons(self, token: Token, k: int = 10, *, kind: str = "value", mode: str = "largest"
                     ) -> ComponentHits:
        """Neurons of every layer ranked by their score for ``token``, in one matrix-vector product.

        kind "value": ``W_out @ W[:, t]`` (neurons that write the token); "key"/"gate":
        ``W_in^T @ R[t]`` (neurons that the token's residual vector drives).
        """
        t = self.to_id(token)
        _topk.check_k(k)
        _topk.check_mode(mode)
        t0 = time.perf_counter()
        if kind == "value":
            scores = self._values_flat @ self.W_T[t]
        elif kind == "key":
            scores = self._keys_flat @ self.R[t]
        elif kind == "gate":
            scores = self._gates_flat @ self.R[t]
        else:
            raise ValueError(f"kind: got {kind!r}; accepted: 'value', 'key' or 'gate'")
        layers, units, vals = self._rank(scores, k, mode, self.w.d_mlp)
        return ComponentHits(f"neurons for {self.token_str(t)} ({kind})", "neuron", layers, units, vals, kind,
                             dict(self.basis), time.perf_counter() - t0)

    @_cached_on_weights
    def _attn_stack(self) -> dict[str, torch.Tensor]:
        return {"W_Q": self.w.W_Q, "W_K": self.w.W_K, "W_V": self.w.W_V, "W_O": self.w.W_O}

    def find_heads(self, src_token: Token, dst_token: Token, k: int = 10, *, kind: str = "ov",
                   mode: str = "largest") -> ComponentHits:
        """Heads of every layer ranked by one circuit entry, all heads in one product.

        kind "ov": entry (src, dst) of each OV circuit (attending to src writes dst);
        "qk": entry (src as query, dst as key).
        """
        s, d = self.to_id(src_token, "src_token"), self.to_id(dst_token, "dst_token")
        _topk.check_k(k)
        _topk.check_mode(mode)
        W = self._attn_stack
        t0 = time.perf_counter()
        if kind == "ov":
            x = torch.einsum("m,lhmd->lhd", self.R[s], W["W_V"])
            y = torch.einsum("lhdm,m->lhd", W["W_O"], self.W_T[d])
        elif kind == "qk":
            x = torch.einsum("m,lhmd->lhd", self.R[s], W["W_Q"])
            y = torch.einsum("m,lhmd->lhd", self.R[d], W["W_K"])
        else:
            raise ValueError(f"kind: got {kind!r}; accepted: 'ov' or 'qk'")
        scores = (x * y).sum(-1).flatten()
        layers, units, vals = self._rank(scores, k, mode, self.n_heads)
        return ComponentHits(f"heads for {self.token_str(s)} -> {self.token_str(d)} ({kind})", "head", layers,
                             units, vals, kind, dict(self.basis), time.perf_counter() - t0)

    @staticmethod
    def _rank(scores: torch.Tensor, k: int, mode: str, per_layer: int):
        key = scores.abs() if mode == "abs" else (-scores if mode == "smallest" else scores)
        # _select keeps, among entries tied at the k-th value, the smallest flat indices (torch.topk
        # alone picks an arbitrary subset of them), and returns (value desc, index asc) order
        _, idx = _topk.select_topk(key, torch.arange(key.numel(), device=key.device), min(k, key.numel()))
        return idx // per_layer, idx % per_layer, scores[idx]

    def copying_scores(self) -> Float[torch.Tensor, "n_layers n_heads"]:
        """Eigenvalue copying score of every head's OV circuit: ``[n_layers, n_heads]``."""
        out = torch.empty(self.n_layers, self.n_heads)
        WV, WO = self._attn_stack["W_V"], self._attn_stack["W_O"]
        # eigenvalues of the small product (W_O W R) W_V [d_head, d_head] equal the nonzero ones of OV
        WR = self.W @ self.R  # [d_model, d_model]
        for l in range(self.n_layers):
            small = WO[l] @ WR @ WV[l]  # [H, d_head, d_head]
            eig = torch.linalg.eigvals(small.double())
            for h in range(self.n_heads):
                out[l, h] = copying_score_from_eigenvalues(eig[h])
        return out

    def __repr__(self) -> str:
        return (f"EmbeddingSpace(d_vocab={self.d_vocab}, read_basis={self.read_basis!r}, "
                f"write_basis={self.write_basis!r}, ln={self.ln!r}, weights={self.w.processing.describe()!r})")


class VocabMatrix:
    """A vocab x vocab matrix ``A @ B`` (``A [d_vocab, r]``, ``B [r, d_vocab]``), never materialised.

    Wraps TransformerLens's ``FactoredMatrix`` (``.factored``) and adds exact streaming top-k,
    rows, columns, the diagonal, the eigenvalue copying score and top-1 diagonal accuracy. ``A`` is
    kept row-major and ``B`` column-major (``B.T`` contiguous): one token's row of A and column of B
    are each one piece of memory, which is what the scans read per entry and per gathered column.
    """

    def __init__(self, space: EmbeddingSpace, A: torch.Tensor, B: torch.Tensor, label: str, kind: str,
                 layer: int | None, head: int | None):
        self.space, self.A, self.B = space, A.contiguous(), B.T.contiguous().T
        self.label, self.kind, self.layer, self.head = label, kind, layer, head

    @property
    def shape(self) -> tuple[int, int]:
        return (self.A.shape[0], self.B.shape[1])

    @property
    def factored(self):
        """The same matrix as a ``transformer_lens.FactoredMatrix`` (shares the factors)."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.A, self.B)

    @property
    def basis(self) -> dict:
        return dict(self.space.basis)

    def topk_pairs(self, k: int = 10, mode: str = "largest", *, rows: Any = None, cols: Any = None,
                   exclude_diagonal: bool = False, budget_bytes: int | None = None,
                   backend: str = "auto") -> TokenPairs:
        """Exact top-k entries (largest, smallest or abs), rows/cols restricted to token sets.

        ``rows``/``cols``: ids, token strings, a bool mask or a filter name; default the space's
        ``filters``. The scan holds at most ``budget_bytes`` of working memory. ``backend``: "auto",
        "cpp" (the compiled scan) or "torch" (see :func:`tl_embedspace.topk_product`).
        """
        sp = self.space
        r = _topk.topk_product(self.A, self.B, k, mode=mode, rows=sp.candidate_ids(rows, "rows"),
                               cols=sp.candidate_ids(cols, "cols"), exclude_diagonal=exclude_diagonal,
                               budget_bytes=budget_bytes or sp.budget_bytes, balance=True, backend=backend)
        return TokenPairs(f"{self.label} top-{k} {mode}", r.rows, r.cols, r.values,
                          [sp.token_str(i) for i in r.rows.tolist()], [sp.token_str(i) for i in r.cols.tolist()],
                          mode, self.basis, r.stats)

    def topk_per_row(self, k: int = 10, mode: str = "largest", *, rows: Any = None, cols: Any = None,
                     exclude_diagonal: bool = False) -> RowTopk:
        """Top-k columns of each selected row (default: the space filter, else every row)."""
        sp = self.space
        rid = sp.candidate_ids(rows, "rows")
        rid = torch.arange(self.shape[0]) if rid is None else rid
        v, c = _topk.topk_per_row(self.A, self.B, k, mode=mode, rows=rid, cols=sp.candidate_ids(cols, "cols"),
                                  exclude_diagonal=exclude_diagonal, budget_bytes=sp.budget_bytes)
        return RowTopk(f"{self.label} top-{k} per row", rid, c, v, sp.token_str, self.basis)

    def row(self, token: Token, k: int = 10, tokens: Any = None) -> TokenScores:
        """Row of ``token`` (OV: what attending to it writes; QK: which keys it as a query prefers)."""
        t = self.space.to_id(token)
        return self.space.token_scores(self.A[t] @ self.B, k, f"{self.label} row {self.space.token_str(t)}", tokens)

    def col(self, token: Token, k: int = 10, tokens: Any = None) -> TokenScores:
        """Column of ``token`` (OV: which source tokens write it; QK: which queries attend to it)."""
        t = self.space.to_id(token)
        return self.space.token_scores(self.A @ self.B[:, t], k, f"{self.label} col {self.space.token_str(t)}", tokens)

    def diag(self) -> Float[torch.Tensor, " d_vocab"]:
        """The diagonal ``[d_vocab]`` (entry (t, t) for every token), from the factors."""
        return _topk.diag_product(self.A, self.B)

    def eigenvalues(self) -> Complex[torch.Tensor, " r"]:
        """Nonzero eigenvalues (complex ``[r]``): those of the small product ``B @ A``."""
        return torch.linalg.eigvals((self.B @ self.A).double())

    def copying_score(self) -> float:
        """Sum of real parts over sum of magnitudes of the eigenvalues (Elhage et al.)."""
        return copying_score_from_eigenvalues(self.eigenvalues())

    def top1_diag_accuracy(self, tokens: Any = None) -> float:
        """Fraction of tokens t whose row maximum is at column t (exact, streamed, pruned)."""
        ids = self.space.candidate_ids(tokens, "tokens")
        acc, _ = _topk.top1_diag_accuracy(self.A, self.B, rows=ids, budget_bytes=self.space.budget_bytes,
                                          balance=True)
        return acc

    def __repr__(self) -> str:
        return f"VocabMatrix({self.label}, shape={self.shape}, rank<={self.A.shape[1]}, {self.basis})"


def space_with_filter(model, filt, *, auto: bool, **kw):
    """An EmbeddingSpace with ``filt``; under "auto" a corpus filter that keeps no token of this
    vocabulary (a toy tokenizer) falls back to no filter instead of failing."""
    try:
        return EmbeddingSpace(model, filters=filt, **kw)
    except EmptyFilterError:
        if not auto:
            raise
        return EmbeddingSpace(model, filters=None, **kw)


def resolve_filter(name, model):
    """A filter name as the CLI and the report take it: "none" -> None, "auto" -> "corpus" where the
    model has token strings (else None), anything else unchanged."""
    if name in (None, "none"):
        return None
    if name == "auto":
        return "corpus" if getattr(model, "tokenizer", None) is not None else None
    return name
