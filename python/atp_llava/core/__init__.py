"""The family-blind core of ATP-LLaVA: the config, the threshold modules, the spatial score, the
losses, where the images are in a batch, the per-forward state, the ATP step, the attention
function, the pruned cache's decode and the efficiency accounting. Nothing here knows a model
family (``atp_llava.models``), the hooks (``atp_llava.patch``) or the tools (``atp_llava.tools``);
DESIGN §2.3."""
