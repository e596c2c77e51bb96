"""The token cache stores K seeded views per image, identical whatever the number of processes."""
import os

import numpy as np
import pytest
import torch

import main_cache_tokens
from conftest import write_image_folder
from taming.models.vqgan import build_vqgan
from train_support import parse, run_torchrun
from util.datasets import SeededImageFolder, pretrain_transform, simclr_transform
from util.errors import UsageError
from util.token_cache import CachedTokenDataset

COMMON = ["--vqgan_config", "config/vqgan_tiny.yaml", "--num_views", "2", "--batch_size", "4",
          "--num_workers", "0", "--device", "cpu", "--amp", "none"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cache_args(data, output_dir, ckpt, *extra):
    return ["--data_path", str(data), "--output_dir", str(output_dir), "--vqgan_ckpt", ckpt, *COMMON, *extra]


def cache_tokens(argv):
    """main_cache_tokens.py in this process (one process, like `python main_cache_tokens.py argv`)."""
    return main_cache_tokens.main(parse(main_cache_tokens, argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"), splits=(("train", 3),), num_classes=2, size=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(123)
    vqgan, _ = build_vqgan("config/vqgan_tiny.yaml")
    vqgan.quantize.embedding.weight.data.normal_(std=0.5)  # spread codes like encoder outputs: no near-ties
    path = str(tmp_path_factory.mktemp("tok") / "vqgan.ckpt")
    torch.save({"state_dict": vqgan.state_dict()}, path)
    return vqgan, path


@pytest.fixture(scope="module")
def single_process_cache(data, tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "one"
    cache_tokens(cache_args(data, cache, tokenizer[1]))
    return str(cache)


def test_view_v_is_the_seeded_augmentation_of_epoch_v_tokenized(single_process_cache, data, tokenizer):
    # (up to a few codes that a random tokenizer's near-ties flip between batch sizes and memory layouts)
    vqgan, _ = tokenizer
    dataset = SeededImageFolder(os.path.join(data, "train"), pretrain_transform(256), seed=0)
    tokens = torch.from_numpy(np.load(os.path.join(single_process_cache, "tokens-rank00000.npy")).astype(np.int64))
    assert tokens.shape == (6, 2, 256)
    for view in range(2):
        dataset.set_epoch(view)
        for index in (0, 4):
            image, _ = dataset[index]
            with torch.no_grad():
                _, _, (_, _, indices) = vqgan.encode(image[None])
            agreement = (tokens == indices).float().mean(dim=-1)  # (images, views)
            assert agreement[index, view] >= 0.85
            assert agreement.argmax() == index * 2 + view


def test_rerun_is_a_no_op_and_other_settings_are_refused(single_process_cache, data, tokenizer, capsys):
    before = os.path.getmtime(os.path.join(single_process_cache, "tokens-rank00000.npy"))
    cache_tokens(cache_args(data, single_process_cache, tokenizer[1]))
    assert "nothing to do" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(single_process_cache, "tokens-rank00000.npy")) == before
    other = cache_args(data, single_process_cache, tokenizer[1], "--num_views", "3")
    with pytest.raises(UsageError, match="other settings"):
        cache_tokens(other)


@pytest.mark.slow
def test_two_processes_write_the_same_cache(data, tokenizer, tmp_path):
    # one image per batch and one thread in every process: the codes are the same by construction (another
    # batch size may round the encoder differently and flip near-tied codes)
    alone = ("--batch_size", "1")
    cache_tokens(cache_args(data, tmp_path / "one", tokenizer[1], *alone))
    run_torchrun("main_cache_tokens.py", cache_args(data, tmp_path / "two", tokenizer[1], *alone))
    single, sharded = CachedTokenDataset(str(tmp_path / "one")), CachedTokenDataset(str(tmp_path / "two"))
    assert len(single) == len(sharded) == 6 and sharded.meta["world_size"] == 2
    for epoch in range(3):
        single.set_epoch(epoch)
        sharded.set_epoch(epoch)
        for i in range(len(single)):
            assert torch.equal(single[i][0], sharded[i][0]) and single[i][1] == sharded[i][1]


def test_views_are_drawn_per_epoch(single_process_cache):
    dataset = CachedTokenDataset(single_process_cache, seed=0)
    tokens = np.load(os.path.join(single_process_cache, "tokens-rank00000.npy")).astype(np.int64)
    assert not np.array_equal(tokens[0, 0], tokens[0, 1])  # two different crops of the image
    seen = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0][0].numpy()
        view = [v for v in range(2) if np.array_equal(tokens[0, v], item)]
        assert len(view) == 1
        seen.update(view)
    assert seen == {0, 1}


def test_two_views_per_sample_are_two_different_cached_views(single_process_cache):
    """MAGE-C's samples: the view a one-view dataset gives, and another one of the K views."""
    one = CachedTokenDataset(single_process_cache, seed=0)
    two = CachedTokenDataset(single_process_cache, seed=0, views_per_sample=2)
    tokens = np.load(os.path.join(single_process_cache, "tokens-rank00000.npy")).astype(np.int64)
    for epoch in range(4):
        one.set_epoch(epoch)
        two.set_epoch(epoch)
        for index in range(len(two)):
            item, label = two[index]
            first, second = two.views(index)
            assert first != second and item.shape == (2, 256) and label == one[index][1]
            assert np.array_equal(item[0].numpy(), one[index][0].numpy())
            assert np.array_equal(item.numpy(), tokens[index, [first, second]])  # rows of the cache in index order
    with pytest.raises(UsageError, match="2 view"):
        CachedTokenDataset(single_process_cache, views_per_sample=3)



def flip_cache_args(data, ckpt, cache, num_views=4):
    return main_cache_tokens.get_args_parser().parse_args([
        "--data_path", data, "--output_dir", cache, "--vqgan_ckpt", ckpt, "--views", "flips",
        "--num_views", str(num_views), "--vqgan_config", "config/vqgan_tiny.yaml", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu", "--amp", "none"])


@pytest.mark.slow
def test_flip_views_hold_the_whole_image_and_its_flips(data, tokenizer, tmp_path):
    """--views flips (demo.py's cache): view k is the whole image (Resize + CenterCrop), flipped not at all,
    horizontally, vertically, or both, tokenized. Compared in this process with the same batches and
    tokenizer settings, so the codes must be equal."""
    _, ckpt = tokenizer
    cache = str(tmp_path / "flips")
    result = main_cache_tokens.main(flip_cache_args(data, ckpt, cache))
    assert result["written"] and (result["num_images"], result["num_views"], result["grid_size"]) == (6, 4, 16)
    tokens = torch.from_numpy(np.load(os.path.join(cache, "tokens-rank00000.npy")).astype(np.int64))

    vqgan, _ = build_vqgan("config/vqgan_tiny.yaml", ckpt)
    vqgan.set_inference_mode(torch.float32, channels_last=True)  # the script's settings for --amp none
    transform = main_cache_tokens.view_transform(flip_cache_args(data, ckpt, cache))
    dataset = SeededImageFolder(os.path.join(data, "train"), transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    for view, dims in enumerate(((), (3,), (2,), (2, 3))):
        with torch.no_grad():
            expected = torch.cat([vqgan.encode(batch.flip(dims))[2][2].view(len(batch), -1)
                                  for batch in images.split(4)])
        assert torch.equal(tokens[:, view], expected), view
    assert not torch.equal(tokens[:, 0], tokens[:, 1]) and not torch.equal(tokens[:, 0], tokens[:, 2])

    assert not main_cache_tokens.main(flip_cache_args(data, ckpt, cache))["written"]  # complete: reused
    with pytest.raises(UsageError, match="--views flips"):
        main_cache_tokens.main(flip_cache_args(data, ckpt, str(tmp_path / "five"), num_views=5))


@pytest.mark.slow
def test_contrastive_views_are_the_simclr_augmentation_tokenized(data, tokenizer, tmp_path):
    """--aug contrastive (MAGE-C's cache): view v is SimCLR's augmentation seeded as epoch v, tokenized."""
    _, ckpt = tokenizer
    cache = str(tmp_path / "contrastive")
    argv = cache_args(data, cache, ckpt, "--aug", "contrastive", "--batch_size", "6")
    assert main_cache_tokens.main(parse(main_cache_tokens, argv))["views"] == "contrastive"
    tokens = torch.from_numpy(np.load(os.path.join(cache, "tokens-rank00000.npy")).astype(np.int64))
    vqgan, _ = build_vqgan("config/vqgan_tiny.yaml", ckpt)
    vqgan.set_inference_mode(torch.float32, channels_last=True)  # the script's settings for --amp none
    dataset = SeededImageFolder(os.path.join(data, "train"), simclr_transform(256))
    for view in range(2):
        dataset.set_epoch(view)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        with torch.no_grad():
            assert torch.equal(tokens[:, view], vqgan.encode(images)[2][2].view(len(images), -1)), view
