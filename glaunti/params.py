"""Parameter files: load and save models as ``.eqx`` files interchangeable with the
published ones.

A published file is Equinox's leaf serialisation of the *authors'* parameter tree: one
``.npy`` record per array leaf, concatenated in tree-flattening order. The authors' trees
differ from our modules only in how they are wrapped:

- A: ``({7 calibrated stored TI params}, {2 fixed ones})`` (dicts, so sorted by name);
- B: ``({'gru': <rnn, out, init_h>}, {})``;
- C/D: ``({'corrector': <corrector>}, {9 stored TI params})``.

:func:`authors_tree` builds that tree from one of our models and :func:`leaf_manifest`
lists its leaves (path, shape, dtype) in file order, so the order lives in code, derived
from our modules, and can be checked against the published manifest.
"""

from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from glaunti import registry


class ParamsError(ValueError):
    """A parameter file does not hold the parameters of the expected model."""


def template(kind: str):
    """A shape-only model ('a', 'b', 'c' or 'd'; leaves are ``jax.ShapeDtypeStruct``) to
    load into: unlike a real fresh model it costs no random initialisation."""
    spec = registry.spec(kind)
    return eqx.filter_eval_shape(lambda: spec.build(jr.PRNGKey(0)))


def authors_tree(model):
    """Our model rewrapped as the authors' parameter tree (see the module docstring)."""
    return model.authors_tree()


def from_authors_tree(template, tree):
    """Inverse of :func:`authors_tree` (``template`` gives the model kind)."""
    return template.from_authors_tree(tree)


def _flatten(model):
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(authors_tree(model))
    for path, leaf in leaves_with_paths:
        if not hasattr(leaf, "shape"):
            raise TypeError(f"non-array leaf {jax.tree_util.keystr(path)} in {type(model).__name__}")
    paths = [jax.tree_util.keystr(path) for path, _ in leaves_with_paths]
    leaves = [leaf for _, leaf in leaves_with_paths]
    return paths, leaves, treedef


def leaf_manifest(model) -> list[dict]:
    """The file's records in order: ``{'path', 'shape', 'dtype'}`` per leaf, as the
    published ``manifest.json`` writes them."""
    paths, leaves, _ = _flatten(model)
    return [
        {"path": p, "shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype))}
        for p, leaf in zip(paths, leaves)
    ]


def load_params(model, path):
    """Load a parameter file into a model of the same kind as ``model``: a template whose
    values are ignored (e.g. ``TIModel.prior()``, ``GRUModel()``, ``GlaUnTI(TIModel.prior())``)
    or a kind ``'a'``..``'d'`` (see :func:`template`).

    Raises:
        ParamsError: the file is missing, truncated, longer than expected, or one of its
            records does not have the shape/dtype of the model's leaf (wrong model).
    """
    path = Path(path)
    if isinstance(model, str):
        model = template(model)
    paths, leaves, treedef = _flatten(model)
    what = f"model {model.kind} ({type(model).__name__}, {len(leaves)} arrays)"
    if not path.is_file():
        raise ParamsError(f"{path}: no such parameter file (expected the parameters of {what})")
    values = []
    with open(path, "rb") as f:
        for i, (leaf_path, leaf) in enumerate(zip(paths, leaves)):
            expected = (tuple(leaf.shape), np.dtype(leaf.dtype))
            try:
                value = np.load(f, allow_pickle=False)
            except (ValueError, EOFError, OSError) as err:
                raise ParamsError(
                    f"{path}: cannot read array {i + 1} of {len(leaves)} ({leaf_path}, "
                    f"shape {expected[0]} {expected[1]}) — truncated or not a parameter file "
                    f"of {what}: {err}"
                ) from err
            if (value.shape, value.dtype) != expected:
                raise ParamsError(
                    f"{path}: array {i + 1} is {value.shape} {value.dtype} but {what} expects "
                    f"{leaf_path} to be {expected[0]} {expected[1]} — a file of another model?"
                )
            if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
                raise ParamsError(
                    f"{path}: array {i + 1} ({leaf_path}) contains NaN or inf, expected finite "
                    f"parameters of {what}"
                )
            values.append(jnp.asarray(value))
        if f.read(1):
            raise ParamsError(
                f"{path}: has data beyond the {len(leaves)} arrays of {what} — a file of "
                f"another model?"
            )
    return from_authors_tree(model, jax.tree_util.tree_unflatten(treedef, values))


def save_params(model, path) -> None:
    """Write ``model`` to ``path`` in the published layout (one ``np.save`` array per leaf, in
    the authors' order). Plain write: ``core.models.save_model`` writes it atomically."""
    _, leaves, _ = _flatten(model)
    with open(path, "wb") as f:
        for leaf in leaves:
            np.save(f, np.asarray(leaf), allow_pickle=False)
