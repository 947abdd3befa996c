"""Label maps: which class index is which person, from data to samples.

A label map is ``{"0": "user_01", "1": "user_02", ...}``: string keys (JSON
objects have no integer keys) ``"0"..."N-1"``, one name each. It is made
once from the data set's sub-folders, stored in every checkpoint and latent
cache, and read back by sampling and evaluation; this module is its one home.

``--user_ids`` rule (the same for every run and every data set):

- a token equal to a class name selects that class (``user_05``, ``alice``);
- a number selects the class whose name ends in that number (``5`` and
  ``05`` select ``user_05``); a number never means a position in the list;
- a token that matches no class, or a number that matches several
  (``user_01`` and ``guest_01``), is an error listing the candidates.

A model trained for classifier-free guidance has one more class, the null
class, named ``<null>`` at the last index; it is never a person to sample.

Folder names come from class names made safe (:func:`safe_folder_name`), so
a name from someone else's checkpoint cannot leave the output folder.

Where class names come from (``label_source``, for every data folder, images
or arrays):

- ``folder``: the first sub-folder under the data folder
  (``DATA/user_01/x.png`` -> ``user_01``);
- ``prefix``: the file name up to the first ``_``, as in guided-diffusion
  (``cat_0001.png`` -> ``cat``);
- ``csv``: a table ``--labels_csv FILE`` with the columns ``file,label``: the
  file's path relative to the data folder (``/`` between folders; a bare name
  for files directly in it) and its class name. An optional first row
  ``file,label`` is a header. Every data file needs a row; rows naming files
  that are not in the folder are ignored (one table may serve several splits);
- ``auto`` (the default): ``csv`` when ``--labels_csv`` is given, else
  ``folder`` when every file sits in a sub-folder, else ``prefix``.
"""

import csv
import os
import re

from ..runtime.errors import UserError, shown

# The extra class of a model trained for classifier-free guidance
# (``--class_dropout_prob``): the last index, under this name.
NULL_CLASS_NAME = "<null>"

_TRAILING_NUMBER = re.compile(r"(\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def normalize_label_map(label_map, source="label map"):
    """``{0: "a", "1": "b"}`` -> ``{"0": "a", "1": "b"}``, checked: keys are
    the indices ``0..N-1``, names are distinct strings. ``None`` or ``{}``
    (unlabelled data) give ``None``."""
    if label_map is None or label_map == {}:
        return None
    if not isinstance(label_map, dict):
        raise UserError(f"{source}: label_map must be an object {{\"0\": name, ...}}, got {type(label_map).__name__}")
    normal = {}
    for key, name in label_map.items():
        text = str(key)
        if isinstance(key, bool) or not text.isdigit() or not isinstance(name, str) or not name:
            raise UserError(f"{source}: label_map entry {key!r}: {name!r} is not an index and a non-empty name")
        normal[str(int(text))] = name
    if sorted(normal, key=int) != [str(i) for i in range(len(normal))]:
        raise UserError(f"{source}: label_map keys must be 0..{len(normal) - 1}, got {sorted(normal, key=int)[:8]}")
    names = list(normal.values())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{source}: label_map names repeat: {', '.join(repeated[:5])}")
    return {str(i): normal[str(i)] for i in range(len(normal))}


def label_map_from_names(class_names):
    """The label map of classes sorted as given: ``["a", "b"]`` -> ``{"0": "a", "1": "b"}``."""
    return normalize_label_map({str(i): str(n) for i, n in enumerate(class_names)})


def with_null_class(label_map):
    """``label_map`` plus the null class at the next index."""
    return {**label_map, str(len(label_map)): NULL_CLASS_NAME}


def null_class_index(label_map):
    """Index of the null class, or None for a model without one."""
    if not label_map:
        return None
    last = str(len(label_map) - 1)
    return int(last) if label_map.get(last) == NULL_CLASS_NAME else None


def people(label_map):
    """The label map without its null class: the classes one may sample."""
    if null_class_index(label_map) is None:
        return label_map
    return {k: v for k, v in label_map.items() if v != NULL_CLASS_NAME}


def default_label_map(num_classes):
    """Names for a class-conditional model that stored none (the original's checkpoints)."""
    return {str(i): f"class_{i:03d}" for i in range(int(num_classes))}


def class_name(label, label_map):
    """The readable name of class index ``label``."""
    if label_map is None:
        return f"class_{int(label):03d}"
    return label_map[str(int(label))]


def resolve_user_ids(tokens, label_map):
    """Class indices for ``--user_ids`` tokens, by the module's rule; repeated
    tokens naming the same class select it once."""
    by_name = {name: int(index) for index, name in people(label_map).items()}
    by_number = {}
    for name, index in by_name.items():
        digits = _TRAILING_NUMBER.search(name)
        if digits:
            by_number.setdefault(int(digits.group(1)), []).append(name)
    chosen = []
    for token in tokens:
        token = str(token).strip()
        if token in by_name:
            index = by_name[token]
        elif token.isdigit():
            names = by_number.get(int(token), [])
            if len(names) > 1:
                raise UserError(f"user id {token} is ambiguous: it matches {', '.join(sorted(names))}; "
                                f"give the name instead")
            if not names:
                raise UserError(f"no class name ends in the number {token}; {_candidates(by_name, by_number)}")
            index = by_name[names[0]]
        else:
            raise UserError(f"unknown user id {shown(token)}; {_candidates(by_name, by_number)}")
        if index not in chosen:
            chosen.append(index)
    return chosen


def _candidates(by_name, by_number):
    names = sorted(by_name, key=by_name.get)
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} classes)" if len(names) > 12 else "")
    numbers = sorted(n for n, found in by_number.items() if len(found) == 1)
    hint = f"; numbers {numbers[0]}..{numbers[-1]} select by the number in the name" if numbers else ""
    return f"the classes are {shown}{hint}"


def safe_folder_name(name):
    """``name`` made into one harmless path component: characters other than
    letters, digits and ``._+-`` become ``_``, and a name that is empty or
    starts with a dot (``..``, hidden files) gets a ``class_`` prefix."""
    safe = _UNSAFE.sub("_", str(name)).strip("_")[:100]
    if not safe or safe.startswith("."):
        safe = "class_" + safe
    return safe


def folder_names(labels, label_map):
    """``{label: folder}`` for the classes in ``labels``: safe names, and two
    classes never share a folder (a clash gets ``_`` appended)."""
    taken, folders = {}, {}
    for label in sorted({int(v) for v in labels}):
        name = class_name(label, label_map)
        folder = safe_folder_name(name)
        while folder in taken and taken[folder] != name:
            folder += "_"
        taken[folder] = name
        folders[label] = folder
    return folders


LABEL_SOURCES = ("auto", "folder", "prefix", "csv")


def _is_remote(path):
    return "://" in path


def relative_parts(path, data_dir):
    """The folders and name of ``path`` below ``data_dir``: ``["user_01", "x.png"]``."""
    if _is_remote(path):
        rel = path[len(data_dir.rstrip("/")) + 1 :]
        return [p for p in rel.split("/") if p]
    rel = os.path.relpath(path, data_dir)
    return [p for p in rel.replace(os.sep, "/").split("/") if p]


def read_labels_csv(path):
    """``{relative file path: class name}`` from a ``file,label`` table."""
    if not os.path.isfile(path):
        raise UserError(f"labels_csv {path!r} not found")
    table = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                cells = [cell.strip() for cell in row]
                if not any(cells):
                    continue
                if number == 1 and [c.lower() for c in cells] == ["file", "label"]:
                    continue
                if len(cells) != 2 or not all(cells):
                    raise UserError(f"labels_csv {path!r} line {number}: expected 'file,label', got {','.join(row)!r}")
                name = "/".join(p for p in cells[0].replace("\\", "/").split("/") if p not in ("", "."))
                if table.get(name, cells[1]) != cells[1]:
                    raise UserError(f"labels_csv {path!r} line {number}: {name!r} has two labels, "
                                    f"{table[name]!r} and {cells[1]!r}")
                table[name] = cells[1]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"labels_csv {path!r} cannot be read: {err}") from None
    if not table:
        raise UserError(f"labels_csv {path!r} holds no 'file,label' rows")
    return table


def class_names_from_paths(paths, data_dir, label_source="auto", labels_csv=""):
    """The class name of each file of ``paths`` (see the module docstring)."""
    if label_source not in LABEL_SOURCES:
        raise UserError(f"label_source must be one of {', '.join(LABEL_SOURCES)}, got {label_source!r}")
    if labels_csv and label_source not in ("auto", "csv"):
        raise UserError(f"labels_csv is given but label_source is {label_source!r}: use label_source csv (or auto)")
    if label_source == "csv" and not labels_csv:
        raise UserError("label_source csv needs --labels_csv FILE (a 'file,label' table)")
    parts = [relative_parts(p, data_dir) for p in paths]
    if label_source == "auto":
        label_source = "csv" if labels_csv else "folder" if all(len(pp) >= 2 for pp in parts) else "prefix"
    if label_source == "csv":
        table = read_labels_csv(labels_csv)
        unlisted = [p for p, pp in zip(paths, parts) if "/".join(pp) not in table]
        if unlisted:
            raise UserError(f"labels_csv {labels_csv!r} has no row for {'/'.join(relative_parts(unlisted[0], data_dir))} "
                            f"({len(unlisted)} of {len(paths)} files of {data_dir} are unlisted)")
        return [table["/".join(pp)] for pp in parts]
    names = []
    for path, pp in zip(paths, parts):
        if label_source == "folder":
            if len(pp) < 2:
                raise UserError(
                    f"label_source='folder' needs every file in a class sub-folder of {data_dir}; "
                    f"{path} is not"
                )
            names.append(pp[0])
        else:
            label, sep, _ = pp[-1].partition("_")
            if not sep or not label:
                raise UserError(
                    f"cannot take a class label from {path}: with files directly in {data_dir} "
                    f"the file names must look like <label>_<anything>.png (or use class sub-folders "
                    f"or --labels_csv)"
                )
            names.append(label)
    return names
