"""Input pipeline: examples per second of the image pipelines, per CPU core, with threads and with worker processes.

    python -m experiments.bench_input [--sets cifar10,celeba,lsun,celebahq,ffhq,ffhq_png] [--seconds 10]
                                      [--workers 2] [--data_dir /tmp/score_sde_bench_input]

Each set is written once as mock data in its real file format and size (smooth random images, whose
compressed size is near the real set's; the ``KiB`` column says what was written), then read by the
pipeline of its paper config (``datasets.build_pipeline`` with the config's global batch,
``n_jitted_steps``, ``image_size``, preparation rule, flip and dequantisation, as one host):

* cifar10: TFDS ArrayRecord of PNG-encoded 32x32 images (``cifar10``'s features), config
  vp/cifar10_ddpmpp_continuous.
* celeba: TFDS ArrayRecord of 178x218 JPEGs with CelebA's attributes and landmarks; central 140 crop,
  resized to 64 (``prepare_celeba``); config ve/celeba_ncsnpp.
* lsun: TFDS ArrayRecord of JPEGs with a shorter side of 256 (``lsun/bedroom``); config
  ve/bedroom_ncsnpp_continuous.
* celebahq / ffhq: StyleGAN dataset-tool TFRecords (raw CHW bytes) at 256 and 1024; configs
  ve/celebahq_256_ncsnpp_continuous and ve/ffhq_ncsnpp_continuous. ffhq_png: the same FFHQ config
  from a folder of 1024x1024 PNGs.

Columns, in examples per second (one example: one image of the batch, decoded and prepared):

* 1 core: element after element in this thread (``pipeline.batches(k)``), per second of this
  process's CPU time, i.e. what one core delivers, independent of the machine's load.
* via workers: the same through grain worker processes (one thread each), per second of the CPU time of
  this process and its workers together: what each core gives when the work is spread over processes
  (the batch is built in shared memory and handed over), again independent of the load.
* 4 threads: the pipeline with ``data.num_threads=4`` and no workers (the previous default), wall time.
* N workers: ``data.num_workers=N`` grain worker processes (one thread each), wall time after their start.
  The two wall-time columns depend on the machine's cores and load.
* needed: an estimate of what one H100 consumes training the config: ``--tflops`` (default 400 TFLOP/s,
  40% of its dense bfloat16 peak: an upper estimate for these U-Nets) over the FLOPs of one example's
  forward and backward pass (XLA's cost analysis of the network, printed as ``GFLOP``). For scale, the
  original's published rate, NCSN++ cont. at 0.20 s per step of 128 on four V100s, is 160 examples/s
  per V100, i.e. 10 TFLOP/s.
* workers: the configs' ``data.num_workers``: 0 where one core delivers 1.25 times the need (the
  training process's threads, which together deliver about one core, keep up), else
  ceil(1.25 needed / via workers) worker processes (each on its own core), a quarter to spare.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import math
import os
import pathlib
import tempfile
import time
import types
from typing import Any, Callable

import grain
import numpy as np
import PIL.Image

from score_sde import datasets

MIB = 2.0**20


def natural_image(rng: np.random.Generator, height: int, width: int, detail: float) -> np.ndarray:
  """uint8 (height, width, 3): smooth random colour fields plus noise of std ``detail``, which sets the
  compressed size (photographs are smooth, so noise-free random pixels would compress far worse)."""
  base = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
  image = np.asarray(PIL.Image.fromarray(base).resize((width, height), PIL.Image.Resampling.BICUBIC), np.float32)
  return np.clip(image + rng.normal(0.0, detail, image.shape), 0, 255).astype(np.uint8)


def encoded(image: np.ndarray, fmt: str, **options) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, fmt, **options)
  return buffer.getvalue()


# --- Mock data in each set's format ---------------------------------------------------------------


def _tfds_set(directory: pathlib.Path, name: str, features: dict[str, Any], examples: Callable[[], Any]):
  """A TFDS set written as ArrayRecord (no TensorFlow), read back as ``tfds``'s data source."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  root = directory / name
  if not (root / "done").exists():
    def body(namespace):
      namespace.update(VERSION=tfds.core.Version("1.0.0"), code_path=None,
                       _info=lambda self: tfds.core.DatasetInfo(builder=self,
                                                                features=tfds.features.FeaturesDict(features)),
                       _split_generators=lambda self, dl_manager: {"train": examples()},
                       _generate_examples=lambda self: examples())

    class_name = "".join(part.title() for part in name.split("_"))  # tfds names the set after the class
    builder = types.new_class(class_name, (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True}, body)
    tfds.disable_progress_bar()
    builder(data_dir=str(root), file_format="array_record").download_and_prepare()
    (root / "done").touch()
  builder_dir = next(p.parent for p in root.rglob("dataset_info.json"))
  return tfds.builder_from_directory(str(builder_dir)).as_data_source(split="train")


def cifar10(directory: pathlib.Path, n: int):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  def examples():
    rng = np.random.default_rng(0)
    for i in range(n):
      yield i, {"image": encoded(natural_image(rng, 32, 32, 8.0), "PNG"), "label": i % 10, "id": f"train_{i:05d}"}

  features = {"image": tfds.features.Image(shape=(32, 32, 3)), "label": tfds.features.ClassLabel(num_classes=10),
              "id": tfds.features.Text()}
  return _tfds_set(directory, "bench_cifar10", features, examples)


def celeba(directory: pathlib.Path, n: int):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  def examples():
    rng = np.random.default_rng(1)
    for i in range(n):
      image = encoded(natural_image(rng, 218, 178, 2.0), "JPEG", quality=90)
      yield i, {"image": image, "landmarks": {k: rng.integers(0, 178, 2) for k in ("lefteye", "righteye")},
                "attributes": {f"attr_{a}": bool(rng.integers(2)) for a in range(40)}}

  landmarks = tfds.features.FeaturesDict({k: tfds.features.Tensor(shape=(2,), dtype=np.int64)
                                          for k in ("lefteye", "righteye")})
  attributes = tfds.features.FeaturesDict({f"attr_{a}": np.bool_ for a in range(40)})
  features = {"image": tfds.features.Image(shape=(218, 178, 3), encoding_format="jpeg"), "landmarks": landmarks,
              "attributes": attributes}
  return _tfds_set(directory, "bench_celeba", features, examples)


def lsun(directory: pathlib.Path, n: int):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  def examples():
    rng = np.random.default_rng(2)
    for i in range(n):
      long_side = int(rng.integers(300, 400))
      shape = (256, long_side) if i % 2 else (long_side, 256)
      yield i, {"image": encoded(natural_image(rng, *shape, 4.0), "JPEG", quality=75)}

  features = {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")}
  return _tfds_set(directory, "bench_lsun", features, examples)


def tfrecord(record: bytes) -> bytes:
  """One TFRecord frame: length, its masked CRC-32C, the record, and a data CRC that the reader does not check
  (zero here)."""
  header = len(record).to_bytes(8, "little")
  crc = datasets._masked_crc(header)  # pylint: disable=protected-access
  return header + crc.to_bytes(4, "little") + record + bytes(4)


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def dataset_tool_example(image_chw: np.ndarray) -> bytes:
  """A ``tf.train.Example`` as StyleGAN's dataset tool writes it: int64 ``shape`` (C, H, W) and raw ``data``."""
  shape = _field(3, _field(1, b"".join(_varint(d) for d in image_chw.shape)))
  data = _field(1, _field(1, image_chw.tobytes()))
  return _field(1, _field(1, _field(1, b"shape") + _field(2, shape)) + _field(1, _field(1, b"data") + _field(2, data)))


def dataset_tool(directory: pathlib.Path, n: int, size: int):
  path = directory / f"bench-r{int(math.log2(size)):02d}.tfrecords"
  if not path.exists():
    rng = np.random.default_rng(3)
    with open(f"{path}.tmp", "wb") as f:
      for _ in range(n):
        f.write(tfrecord(dataset_tool_example(natural_image(rng, size, size, 2.0).transpose(2, 0, 1))))
    os.replace(f"{path}.tmp", path)
  return datasets.TFRecordSource([path])


def png_folder(directory: pathlib.Path, n: int, size: int):
  folder = directory / f"png{size}"
  if not (folder / "done").exists():
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    for i in range(n):
      (folder / f"{i:05d}.png").write_bytes(encoded(natural_image(rng, size, size, 2.0), "PNG"))
    (folder / "done").touch()
  return datasets.ImageFileSource(sorted(folder.glob("*.png")))


@dataclasses.dataclass(frozen=True)
class Bench:
  config: str               # the paper config whose pipeline reads the set
  dataset: str              # its IMAGE_DATASETS entry (preparation rule)
  source: Callable[[pathlib.Path], Any]
  fmt: str


SETS = {
    "cifar10": Bench("vp/cifar10_ddpmpp_continuous", "cifar10", lambda d: cifar10(d, 2560), "TFDS PNG 32"),
    "celeba": Bench("ve/celeba_ncsnpp", "celeba", lambda d: celeba(d, 1280), "TFDS JPEG 178x218"),
    "lsun": Bench("ve/bedroom_ncsnpp_continuous", "lsun/bedroom", lambda d: lsun(d, 640), "TFDS JPEG 256+"),
    "celebahq": Bench("ve/celebahq_256_ncsnpp_continuous", "celebahq", lambda d: dataset_tool(d, 320, 256),
                      "TFRecord raw 256"),
    "ffhq": Bench("ve/ffhq_ncsnpp_continuous", "ffhq", lambda d: dataset_tool(d, 48, 1024), "TFRecord raw 1024"),
    "ffhq_png": Bench("ve/ffhq_ncsnpp_continuous", "ffhq", lambda d: png_folder(d, 48, 1024), "PNG 1024"),
}


def _size_kib(source) -> float:
  """Mean stored bytes per example."""
  if isinstance(source, (datasets.TFRecordSource, datasets.ImageFileSource)):
    return sum(p.stat().st_size for p in source.paths) / len(source) / 1024
  return sum(len(source.data_source[i]) for i in range(min(len(source), 64))) / min(len(source), 64) / 1024


# --- Measurements ---------------------------------------------------------------------------------


def flops_per_example(config) -> float:
  """XLA's FLOP count of the network's forward and backward pass on one example."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from score_sde import builders  # pylint: disable=import-outside-toplevel

  network, shape = builders.build_network(config), builders.example_shape(config)
  params = builders.abstract_params(network, shape)
  loss = lambda p, x, t: jnp.mean(network.apply({"params": p}, x, t, train=False) ** 2)
  x, t = jax.ShapeDtypeStruct((1, *shape), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.jit(jax.grad(loss)).lower(params, x, t).cost_analysis()["flops"]


def pipeline(bench: Bench, source, config, threads: int, workers: int) -> datasets.Pipeline:
  return datasets.build_pipeline(
      source, name=f"{bench.dataset}/train", batch_size=config.training.batch_size, training=True, seed=0,
      image_size=config.data.image_size, prepare=datasets.IMAGE_DATASETS[bench.dataset].prepare,
      random_flip=config.data.random_flip, uniform_dequantization=config.data.uniform_dequantization,
      n_jitted_steps=config.training.n_jitted_steps, process_index=0, process_count=1,
      read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8), num_workers=workers)


def per_core_rate(p: datasets.Pipeline, seconds: float) -> float:
  """Examples per second of CPU time, element after element in this thread."""
  per_element = p.per_host_batch_size * p.n_jitted_steps
  p.batches(0)  # warm-up: file handles, first decode
  cpu, wall, k = time.process_time(), time.perf_counter(), 1
  while time.perf_counter() - wall < seconds or k < 3:
    p.batches(k)
    k += 1
  return (k - 1) * per_element / (time.process_time() - cpu)


def _cpu_seconds() -> float:
  """CPU seconds of this process and its live children (grain's workers)."""
  import psutil  # pylint: disable=import-outside-toplevel

  processes = [psutil.Process()] + psutil.Process().children(recursive=True)
  total = 0.0
  for process in processes:
    try:
      times = process.cpu_times()
      total += times.user + times.system
    except psutil.NoSuchProcess:
      pass
  return total


def stream_rate(p: datasets.Pipeline, seconds: float) -> tuple[float, float]:
  """Examples per second of wall time from an iterator after its first element (worker start-up), and per
  CPU second of this process and its workers together."""
  per_element = p.per_host_batch_size * p.n_jitted_steps
  stream = p.make_iterator()
  next(stream)
  start, cpu, k = time.perf_counter(), _cpu_seconds(), 0
  while time.perf_counter() - start < seconds or k < 3:
    next(stream)
    k += 1
  rate, cpu_rate = k * per_element / (time.perf_counter() - start), k * per_element / (_cpu_seconds() - cpu)
  stream.close()
  return rate, cpu_rate


def workers_for(needed: float, core: float, worker_core: float, spare: float = 1.25) -> int:
  """Worker processes for ``needed`` examples/s: 0 when one core (this process's threads) keeps up, else enough
  at ``worker_core`` examples per core through workers."""
  return 0 if core >= spare * needed else math.ceil(spare * needed / worker_core)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sets", default=",".join(SETS))
  parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
  parser.add_argument("--workers", type=int, default=2, help="worker processes of the last measurement")
  parser.add_argument("--tflops", type=float, default=400.0, help="assumed sustained TFLOP/s of one accelerator")
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "score_sde_bench_input"))
  args = parser.parse_args()
  directory = pathlib.Path(args.data_dir)
  directory.mkdir(parents=True, exist_ok=True)
  print(f"cpu cores: {os.cpu_count()}; load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"needed: {args.tflops:g} TFLOP/s over the FLOPs of one example")
  print(f"{'set':<10}{'format':<19}{'batch':>9}{'KiB':>8}{'GFLOP':>7}{'1 core':>8}{'via workers':>12}{'4 threads':>10}"
        f"{f'{args.workers} workers':>11}{'needed':>8}{'workers':>8}", flush=True)
  for name in args.sets.split(","):
    bench = SETS[name]
    config = importlib.import_module(f"configs.{bench.config.replace('/', '.')}").get_config()
    source = bench.source(directory)
    gflop = flops_per_example(config) / 1e9
    needed = args.tflops * 1e3 / gflop
    core = per_core_rate(pipeline(bench, source, config, 0, 0), args.seconds)
    threads, _ = stream_rate(pipeline(bench, source, config, 4, 0), args.seconds)
    workers, worker_core = stream_rate(pipeline(bench, source, config, 1, args.workers), args.seconds)
    batch = f"{config.training.n_jitted_steps}x{config.training.batch_size}"
    print(f"{name:<10}{bench.fmt:<19}{batch:>9}{_size_kib(source):>8.1f}{gflop:>7.0f}{core:>8.0f}{worker_core:>12.0f}"
          f"{threads:>10.0f}{workers:>11.0f}{needed:>8.0f}{workers_for(needed, core, worker_core):>8}", flush=True)
  print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
