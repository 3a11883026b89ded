import math

import pytest
import torch
import torchvision

from carve3d_trl.rewards import ImageMetric, MRCReward, alexnet_weights_path, load_lpips


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_missing_alexnet_weights_error_names_the_file_and_the_folder(torch_home):
    assert alexnet_weights_path() == torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    folder = str(torch_home / "hub" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as error:
        MRCReward(metric="lpips")
    assert folder in str(error.value)
    assert "lpips_pretrained=False" in str(error.value)


def test_pretrained_trunk_is_loaded_from_the_torch_hub_folder(torch_home):
    alexnet = torchvision.models.alexnet()
    path = alexnet_weights_path()
    path.parent.mkdir(parents=True)
    torch.save(alexnet.state_dict(), path)
    model = load_lpips(pretrained=True)
    torch.testing.assert_close(model.net.slice1[0].weight, alexnet.features[0].weight)
    torch.testing.assert_close(model.net.slice5[0].bias, alexnet.features[10].bias)
    assert not any(p.requires_grad for p in model.parameters())


def test_pixel_metrics():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.1)
    y[1] = 0.5
    torch.testing.assert_close(ImageMetric("mse")(x, y), torch.tensor([0.01, 0.25]))
    psnr = ImageMetric("psnr")
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, -10 * math.log10(0.25)]))
    assert psnr.higher_is_better and not ImageMetric("mse").higher_is_better
    with pytest.raises(ValueError, match="'lpips', 'mse', 'psnr'"):
        ImageMetric("ssim")


def test_random_trunk_lpips_is_zero_for_equal_images_only():
    metric = ImageMetric("lpips", lpips_pretrained=False)
    x = torch.rand(2, 3, 32, 32)
    distances = metric(x, torch.cat([x[:1], 1 - x[1:]]))
    assert distances.shape == (2,)
    assert distances[0].abs() < 1e-6 and distances[1] > 0
