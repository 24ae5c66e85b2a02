"""The reference notes' PyTorch nets, rebuilt module for module, defects kept on purpose.

Why these exist: someone who trained a net with a note's own code holds a ``state_dict`` saved
the way that code saves it. ``tests/test_convert.py`` makes such files here (seeded init, then
``torch.save(model.state_dict())``) and checks that they load strictly into ``torch_ref`` and
convert into ``flaxnets``. So each class below must give the note's ``state_dict`` exactly: the
same key names in the same order, the same shapes and dtypes, the same values for a given
``torch.manual_seed`` (same layers built in the same order, same init calls), and, where the
note's ``forward`` runs, the same outputs.

The code is written for this project; only the resulting modules mirror the notes (in
``/work/shared/reference``). The defects listed in that folder's README are kept here where they
are visible from outside (``torch_ref`` is where they are corrected), and each docstring says which.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _mlp(widths: Sequence[int], act: Callable[[], nn.Module]) -> nn.Sequential:
    """Linear layers through ``widths`` with ``act()`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(act())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- corr2d_and_lenet.txt


class LeNet(nn.Module):
    """``LeNet`` of ``corr2d_and_lenet.txt``: two sigmoid conv/max-pool stages, a 256-120-84-10 MLP.

    Keys ``conv.{0,3}.*`` and ``fc.{0,2,4}.*``. Defect kept: the forward flattens with ``view``,
    which refuses non-contiguous feature maps (``torch_ref`` flattens instead).
    """

    def __init__(self) -> None:
        super().__init__()
        stages = [(1, 6), (6, 16)]
        self.conv = nn.Sequential(
            *(m for c_in, c_out in stages for m in (nn.Conv2d(c_in, c_out, 5), nn.Sigmoid(), nn.MaxPool2d(2))))
        self.fc = _mlp([16 * 4 * 4, 120, 84, 10], nn.Sigmoid)

    def forward(self, img: Tensor) -> Tensor:
        maps = self.conv(img)
        return self.fc(maps.view(len(img), -1))


# ---------------------------------------------------------------- dilated_cnn_fashionmnist.txt


def _dilated_stage(c_in: int, c_out: int, padding: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=1, padding=padding, dilation=2), nn.ReLU(), nn.AvgPool2d(2))


class MyConvDilaNet(nn.Module):
    """``MyConvDilaNet`` of ``dilated_cnn_fashionmnist.txt``: two dilation-2 conv/ReLU/avg-pool stages
    (padding 1, then 0), then a 512-256-128-10 ReLU MLP named ``classifier``.

    Defect kept: the ``view`` flatten (non-contiguous inputs fail); otherwise the note's net is sound.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _dilated_stage(1, 16, padding=1)
        self.conv2 = _dilated_stage(16, 32, padding=0)
        self.classifier = _mlp([32 * 4 * 4, 256, 128, 10], nn.ReLU)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv2(self.conv1(x))
        return self.classifier(x.view(x.size(0), -1))


# ---------------------------------------------------------------- cifar2_bird_vs_airplane_nets.txt


class _TanhCifar2Net(nn.Module):
    """What the four bird-vs-airplane nets share: ``conv1`` (3 -> n), ``conv2`` (n -> n/2), both 3x3
    padding 1, each optionally followed by ``conv{i}_{extra_name}`` built by ``extra(channels)``;
    then ``fc1`` (n/2 * 8 * 8 -> 32) and ``fc2`` (32 -> 2). Registration order is the note's, so
    keys and the order the seeded init runs in are too."""

    def __init__(self, n_channel: int, extra_name: str | None = None,
                 extra: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.n_channel = n_channel
        widths = (3, n_channel, n_channel // 2)
        for i in (1, 2):
            setattr(self, f"conv{i}", nn.Conv2d(widths[i - 1], widths[i], kernel_size=3, padding=1))
            if extra is not None:
                setattr(self, f"conv{i}_{extra_name}", extra(widths[i]))
        self.flat_features = widths[2] * 8 * 8
        self.fc1 = nn.Linear(self.flat_features, 32)
        self.fc2 = nn.Linear(32, 2)

    def _features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # the note reshapes with view(-1, features): a wrong batch instead of an error if sizes are off
        hidden = torch.tanh(self.fc1(self._features(x).view(-1, self.flat_features)))
        return self.fc2(hidden)


def _tanh_pool(x: Tensor) -> Tensor:
    return F.max_pool2d(torch.tanh(x), 2)


class Net(_TanhCifar2Net):
    """``Net`` of ``cifar2_bird_vs_airplane_nets.txt`` (16 and 8 channels, 18,090 parameters).

    Defect kept: ``out.view(-1, 8*8*8)`` (fails on non-contiguous maps; ``torch_ref`` flattens).
    The extra ``n_channel`` attribute is not in the note but is not part of the state_dict.
    """

    def __init__(self) -> None:
        super().__init__(16)

    def _features(self, x: Tensor) -> Tensor:
        return _tanh_pool(self.conv2(_tanh_pool(self.conv1(x))))


class NetDropout(_TanhCifar2Net):
    """``NetDropout`` of ``cifar2_bird_vs_airplane_nets.txt``: ``conv1``, ``conv1_dropout``, ``conv2``,
    ``conv2_dropout`` (``Dropout2d(p=0.4)``), ``fc1``, ``fc2``.

    Defect kept (tests/test_convert.py marks its forward as not comparable): the forward never calls
    ``conv2`` and applies ``conv2_dropout`` twice, ``conv1_dropout`` never. The view to 16*8*8 then
    splits each 32x8x8 map into two rows, so a batch of B gives 2B outputs instead of failing.
    """

    def __init__(self, n_channel: int = 32) -> None:
        super().__init__(n_channel, "dropout", lambda _: nn.Dropout2d(p=0.4))

    def _features(self, x: Tensor) -> Tensor:
        out = self.conv2_dropout(_tanh_pool(self.conv1(x)))
        return self.conv2_dropout(_tanh_pool(out))  # the note's second block, minus its conv


class NetBatchNorm(_TanhCifar2Net):
    """``NetBatchNorm`` of ``cifar2_bird_vs_airplane_nets.txt``: ``conv{i}_batchnorm`` after each conv,
    before tanh and pooling (38,386 parameters plus running stats and ``num_batches_tracked``).

    Defect kept: the ``view(-1, ...)`` flatten, as in ``Net``.
    """

    def __init__(self, n_channel: int = 32) -> None:
        super().__init__(n_channel, "batchnorm", lambda c: nn.BatchNorm2d(num_features=c))

    def _features(self, x: Tensor) -> Tensor:
        out = x
        for conv, norm in ((self.conv1, self.conv1_batchnorm), (self.conv2, self.conv2_batchnorm)):
            out = _tanh_pool(norm(conv(out)))
        return out


# ---------------------------------------------------------------- resnet_cifar_and_confusion_matrix.txt


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class _ZeroPadShortcut(nn.Module):
    """Option A shortcut: keep every second row and column, pad ``pad`` zero channels on each side.
    No parameters; the note wraps the same lambda in a ``LambdaLayer``."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(nn.Module):
    """``BasicBlock`` of ``resnet_cifar_and_confusion_matrix.txt``: conv-BN-ReLU, conv-BN, plus a
    shortcut, then ReLU. When the shape changes the shortcut is option A (subsample by 2 and zero-pad
    ``planes // 4`` channels each side, no keys) or option B (``shortcut.0`` 1x1 conv, ``shortcut.1`` BN).

    Defects kept: option A subsamples by 2 whatever the stride and pads ``planes // 4`` per side
    (right only when the width doubles); an unknown ``option`` silently gives an identity shortcut.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A") -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        reshapes = stride != 1 or in_planes != planes
        if reshapes and option == "A":
            self.shortcut: nn.Module = _ZeroPadShortcut(planes // 4)
        elif reshapes and option == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(residual + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ``ResNet`` of ``resnet_cifar_and_confusion_matrix.txt`` (16-32-64 channels, ``layer1..3``
    of ``block``, global average pool, ``linear``). ``ResNet(BasicBlock, [3, 3, 3])`` is ResNet-20.

    Init as the note's ``self.apply(_weights_init)`` (that helper is the CIFAR ResNet reference's,
    the note calls it without showing it): ``kaiming_normal_`` on every conv and linear weight, in
    module order, after all layers are built; biases and BN keep torch's defaults.
    Defect kept: pooling with a window of the map's width assumes square maps.
    """

    def __init__(self, block: type[BasicBlock], num_blocks: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, (planes, depth, stride) in enumerate(zip((16, 32, 64), num_blocks, (1, 2, 2)), start=1):
            blocks = []
            for s in [stride] + [1] * (depth - 1):
                blocks.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # leaves only, so the same order as Module.apply's post-order walk
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3):
            out = stage(out)
        out = F.avg_pool2d(out, out.size(3))
        return self.linear(out.view(out.size(0), -1))


# ---------------------------------------------------------------- densenet121_se_imagefolder.txt


class DenseLayer(nn.Sequential):
    """Bottleneck layer of ``densenet121_se_imagefolder.txt``: norm1-relu1-conv1 (1x1 to
    ``bn_size * growth_rate``), norm2-relu2-conv2 (3x3 to ``growth_rate``), optional dropout, and the
    input concatenated in front of the new channels."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        width = bn_size * growth_rate
        super().__init__(OrderedDict([
            ("norm1", nn.BatchNorm2d(num_input_features)),
            ("relu1", nn.ReLU(inplace=True)),
            ("conv1", nn.Conv2d(num_input_features, width, kernel_size=1, stride=1, bias=False)),
            ("norm2", nn.BatchNorm2d(width)),
            ("relu2", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv2d(width, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)),
        ]))
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        new = super().forward(x)
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return torch.cat([x, new], 1)


class DenseBlock(nn.Sequential):
    """``num_layers`` DenseLayers named ``denselayer1..``, the k-th seeing ``growth_rate`` more inputs."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__(OrderedDict(
            (f"denselayer{k + 1}", DenseLayer(num_input_features + k * growth_rate, growth_rate, bn_size, drop_rate))
            for k in range(num_layers)))


class Transition(nn.Sequential):
    """Between dense blocks: norm-relu-conv (1x1) then a 2x2 average pool ``pool``."""

    def __init__(self, num_input_feature: int, num_output_features: int) -> None:
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(num_input_feature)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(num_input_feature, num_output_features, kernel_size=1, stride=1, bias=False)),
            ("pool", nn.AvgPool2d(2, stride=2)),
        ]))


class SEAttention(nn.Module):
    """Squeeze-excitation of ``densenet121_se_imagefolder.txt``: global average pool, then ``fc``
    (Linear c -> c/r, ReLU, Linear c/r -> c, Sigmoid, no biases) scaling each channel.

    The note also defines an ``init_weights`` method that nothing calls; it is left out, which
    changes neither keys nor values.
    """

    def __init__(self, channel: int = 512, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        squeezed = channel // reduction
        self.fc = nn.Sequential(nn.Linear(channel, squeezed, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(squeezed, channel, bias=False), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc(self.avg_pool(x).flatten(1))
        return x * scale[:, :, None, None]


def _densenet_init(modules: Iterable[nn.Module]) -> None:
    """The note's init loop: kaiming-normal conv weights, BN weight 1 / bias 0, linear biases 0
    (linear weights keep torch's default)."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.constant_(m.bias, 0)


class DenseNet(nn.Module):
    """DenseNet (121 by default) with an SE block, of ``densenet121_se_imagefolder.txt``.

    ``features``: conv0/norm0/relu0/pool0, then ``denseblock{i}`` with ``transition{i}`` between
    blocks (channels times ``compression_rate``), then norm5/relu5; ``se`` (1024 channels, reduction
    8); ``classifier``. Init by the note's loop over ``self.modules()``.

    Defects kept (tests/test_convert.py marks its forward as not comparable): ``forward`` computes
    ``self.se(features)`` and throws it away, then pools the raw features with a fixed 7x7 window
    (only 224x224 inputs reach the classifier with the right width); ``se`` is built for 1024
    channels whatever ``block_config`` gives.
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, compression_rate: float = 0.5,
                 drop_rate: float = 0, num_classes: int = 1000) -> None:
        super().__init__()
        stem: OrderedDict[str, nn.Module] = OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
        ])
        self.features = nn.Sequential(stem)
        channels = num_init_features
        last = len(block_config)
        for i, depth in enumerate(block_config, start=1):
            self.features.add_module(f"denseblock{i}", DenseBlock(depth, channels, bn_size, growth_rate, drop_rate))
            channels += depth * growth_rate
            if i < last:
                reduced = int(channels * compression_rate)
                self.features.add_module(f"transition{i}", Transition(channels, reduced))
                channels = reduced
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        self.se = SEAttention(channel=1024, reduction=8)
        self.classifier = nn.Linear(channels, num_classes)
        _densenet_init(self.modules())

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        self.se(features)  # the note's SE output, unused
        pooled = F.avg_pool2d(features, 7, stride=1)
        return self.classifier(pooled.view(features.size(0), -1))
