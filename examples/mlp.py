"""A plain MLP classifier: the simplest model sparsec compiles.

    python examples/mlp.py
"""
import torch
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 256, hidden: int = 512, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.head(x)


def build_model():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(8, 256),)


if __name__ == "__main__":
    import sparsec

    model, inputs = build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=inputs)
    print(cm.plan)
    print(cm.graph_module.code)
