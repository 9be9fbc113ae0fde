"""Plain ``nn.Module`` backbones (no Lightning, no DP code)."""

from dplit.models.bilstm import BiLSTMClassifier
from dplit.models.causal_lm import CausalLM
from dplit.models.cnn import MnistCNN, TanhCNN
from dplit.models.embedding import HashedWordEmbedding
from dplit.models.lstm import LSTM, LSTMScan
from dplit.models.mlp import TabularMLP
from dplit.models.resnet import ResNet18GN
from dplit.models.timm_backbone import TimmBackbone
from dplit.models.transformer import TransformerClassifier

__all__ = [
    "LSTM",
    "BiLSTMClassifier",
    "CausalLM",
    "HashedWordEmbedding",
    "LSTMScan",
    "MnistCNN",
    "ResNet18GN",
    "TabularMLP",
    "TanhCNN",
    "TimmBackbone",
    "TransformerClassifier",
]
