"""An ImageNet-like folder of JPEG photographs for the pipeline benchmarks, built from the
colour photographs that scikit-image ships inside its wheel (skimage/data/*.png|jpg: the
astronaut, a cat, coffee, a rocket launch, the Hubble deep field, a retina, a stained
tissue section, a motorcycle stereo pair); read as files, nothing downloaded.

Each output image is a random 4:3 (or, one in four, 3:4) window of one photograph, covering
30-100 % of the largest such window, resized with Lanczos to 500 x 375 (ImageNet's typical
size), randomly mirrored and saved at JPEG quality 85-95, in train/class_<photo>/.
Photographs smaller than 500 x 375 (the cat, 451 x 300) come out upsampled and so smoother
than a real photo of that size.
"""
import importlib.util
import os

import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
          "retina.jpg", "ihc.png", "motorcycle_left.png", "motorcycle_right.png")


def photo_dir() -> str:
  """skimage/data inside the installed scikit-image (the `bench` extra), without importing it."""
  spec = importlib.util.find_spec("skimage")
  if spec is None:
    raise SystemExit("error: scikit-image is not installed (pip install -e '.[bench]'); its "
                     "bundled photographs are the benchmark's images")
  return os.path.join(spec.submodule_search_locations[0], "data")


def load_photos() -> list[tuple[str, Image.Image]]:
  photos = []
  for name in PHOTOS:
    with Image.open(os.path.join(photo_dir(), name)) as image:
      photos.append((name.split(".")[0], image.convert("RGB")))
  return photos


def window(rng, width: int, height: int, aspect: float):
  """A random (left, top, right, bottom) of `aspect` covering 30-100 % of the largest one."""
  w_max = min(width, height * aspect)
  side = np.sqrt(rng.uniform(0.3, 1.0)) * w_max
  w, h = side, side / aspect
  left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
  return left, top, left + w, top + h


def write_photo_folder(root: str, num_images: int, size=(500, 375), seed: int = 0) -> None:
  """num_images JPEGs of `size` (W, H) (or H x W, one in four) in root/train/class_<photo>/."""
  rng = np.random.default_rng(seed)
  photos = load_photos()
  for i in range(num_images):
    name, photo = photos[i % len(photos)]
    w, h = size if rng.random() >= 0.25 else size[::-1]
    box = window(rng, *photo.size, w / h)
    image = photo.resize((w, h), Image.Resampling.LANCZOS, box=box)
    if rng.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    directory = os.path.join(root, "train", f"class_{name}")
    os.makedirs(directory, exist_ok=True)
    image.save(os.path.join(directory, f"{i:05d}.jpg"), quality=int(rng.integers(85, 96)))
