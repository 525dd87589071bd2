"""``losskit.client``: the seed-002 client of ``losskit serve``.

The seed's imports become ``from losskit.client import TinkerClient, custom_loss, LossFnOutput``, and its
``hf_backend`` is the client itself (``hf_backend = client``)::

    client = TinkerClient("http://localhost:8000")

    @custom_loss(client, name="my_custom_loss")
    def my_loss(model_outputs, loss_fn_inputs, attention_mask):
        ...
        return LossFnOutput(loss=loss, logprobs=target_logprobs, diagnostics={"loss": loss.item()})

    result = client.forward_backward(model_id="my-model", data=rows, loss_fn="my_custom_loss")

Custom losses are traced into allowlisted torch.fx graphs and checked locally with the server's own rules, so
the client needs torch and httpx but none of the server extras.
"""

from losskit.client.decorator import custom_loss
from losskit.client.futures import ClientFuture, LocalFuture
from losskit.client.tinker_client import TinkerClient
from losskit.client.transport import RequestFailed
from losskit.contract import LossFnOutput
from losskit.service.fx_trace import CustomLossTraceError
from losskit.service.loss_graph import CustomLossError

__all__ = ["ClientFuture", "CustomLossError", "CustomLossTraceError", "LocalFuture", "LossFnOutput", "RequestFailed",
           "TinkerClient", "custom_loss"]
