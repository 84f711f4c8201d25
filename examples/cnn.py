"""A small CNN: conv + batchnorm + relu + pooling stages, a strided and a grouped conv, a linear head.

    python examples/cnn.py
"""
import torch
import torch.nn as nn


def conv_bn_relu(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class CNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn_relu(3, 32)                 # K = 3*3*3 = 27: never fits 2:4, and it is the first layer
        self.stage1 = nn.Sequential(conv_bn_relu(32, 64), conv_bn_relu(64, 64), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(conv_bn_relu(64, 128, stride=2), conv_bn_relu(128, 128, groups=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def build_model():
    torch.manual_seed(0)
    model = CNN().eval()
    with torch.no_grad():  # non-trivial batchnorm statistics, as a trained model would have
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model, (torch.randn(2, 3, 32, 32),)


if __name__ == "__main__":
    import sparsec

    model, inputs = build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=inputs)
    print(cm.plan)
