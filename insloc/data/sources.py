"""Where images come from: the built-in photographs, a folder, or a list file. All give a list of paths."""
import hashlib
import importlib.util
import os
import warnings

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Real photographs inside the scikit-image wheel itself (skimage/data/*; the others in skimage.data are
# downloaded on first use through pooch and are not used), and scikit-learn's two sample images.
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
                  "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
                  "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg",
                  "text.png", "clock_motion.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def _package_dir(name):
    # find_spec locates the installed package without importing it (importing skimage takes seconds)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the built-in images need the '{name}' package (pip install "
                           f"{'scikit-image' if name == 'skimage' else 'scikit-learn'})")
    return list(spec.submodule_search_locations)[0]


def builtin_image_paths():
    """The ~21 photographs shipped inside the scikit-image and scikit-learn wheels (offline)."""
    skimage_dir = os.path.join(_package_dir("skimage"), "data")
    sklearn_dir = os.path.join(_package_dir("sklearn"), "datasets", "images")
    paths = [os.path.join(skimage_dir, n) for n in SKIMAGE_PHOTOS] + \
            [os.path.join(sklearn_dir, n) for n in SKLEARN_PHOTOS]
    return [p for p in paths if os.path.isfile(p)]


def folder_image_paths(folder):
    """Every image file under `folder`, recursively, sorted. Hidden files and folders (names starting with
    '.', such as the '._x.JPEG' metadata files macOS leaves beside each image) are skipped, a folder
    reached twice through symbolic links (a loop, or two links to one folder) is listed once, and folders
    that cannot be read are left out with a warning."""
    paths, seen, unreadable = [], set(), []
    for root, dirs, files in os.walk(folder, onerror=unreadable.append, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if unreadable:  # os.walk leaves such folders out silently
        warnings.warn(f"data source {folder!r}: {len(unreadable)} folder(s) could not be read and are left out "
                      f"(first: {unreadable[0]})", stacklevel=2)
    return paths


def list_file_image_paths(list_file):
    """One path per line (blank lines and '#' comments skipped); relative paths are taken relative to
    the list file's folder."""
    base = os.path.dirname(os.path.abspath(list_file))
    return [os.path.join(base, p) for p in _list_file_entries(list_file)]


def _list_file_entries(list_file):
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise RuntimeError(f"data source {list_file!r} is a file but not a UTF-8 text file listing image paths "
                           f"(a folder of images or such a list is expected): {e}") from e
    return [p for p in lines if p and not p.startswith("#")]


def image_paths(source):
    """'builtin', a folder, or a text file listing image paths."""
    if source == "builtin":
        paths = builtin_image_paths()
    elif os.path.isdir(source):
        paths = folder_image_paths(source)
    elif os.path.isfile(source):
        paths = list_file_image_paths(source)
    else:
        raise FileNotFoundError(f"data source {source!r} is not 'builtin', a folder or a list file")
    if not paths:
        raise RuntimeError(f"no images found in data source {source!r}")
    return paths


def listing_fingerprint(paths, source):
    """A digest of the listing as every process should see it: a folder's images by their paths relative to
    it, a list file's entries as written, the built-in photographs by name. Copies of one dataset on several
    machines agree (wherever they are mounted); a folder with a file missing, extra or renamed does not.
    Under a second for ImageNet's 1.28M paths (hashed as one byte array)."""
    if source == "builtin":
        return PathList([os.path.basename(p) for p in paths]).digest()
    if os.path.isdir(source):  # os.walk's paths all start with the folder as given, then a separator
        prefix = os.fsencode(source)
        return PathList.of(paths).digest(len(prefix) + (not prefix.endswith(os.sep.encode())))
    return PathList(_list_file_entries(source)).digest()


class PathList:
    """An immutable list of paths stored as one byte array and its offsets. A Python list of str keeps one
    object per path whose reference count every read writes, so each forked data-loading worker gradually
    copies the pages it touches (about 150 MB per worker for half of ImageNet's 1.28M paths); these two
    arrays are never written after construction and stay shared."""

    def __init__(self, paths):
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    @classmethod
    def of(cls, paths):
        return paths if isinstance(paths, cls) else cls(paths)

    def __len__(self):
        return len(self.offsets) - 1

    def digest(self, skip=0):
        """sha1 hex digest of the paths without their first `skip` bytes (a common prefix), and their lengths."""
        starts, lengths = self.offsets[:-1], np.diff(self.offsets)
        if len(self) and lengths.min() < skip:
            raise ValueError(f"a path is shorter than the {skip} bytes to skip")
        keep = np.ones(len(self.data), dtype=bool)
        if skip and len(self):
            edges = np.zeros(len(self.data) + 1, dtype=np.int8)  # +1 at each start, -1 skip bytes later
            np.add.at(edges, starts, 1)
            np.add.at(edges, starts + skip, -1)
            keep = np.cumsum(edges[:-1], dtype=np.int8) == 0
        digest = hashlib.sha1(self.data[keep].tobytes())
        digest.update((lengths - skip).astype("<i8").tobytes())
        return digest.hexdigest()

    def __getitem__(self, index):
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"path index {index} out of range for {n} paths")
        index %= n
        return os.fsdecode(self.data[self.offsets[index]:self.offsets[index + 1]].tobytes())

    def __iter__(self):
        return (self[i] for i in range(len(self)))
