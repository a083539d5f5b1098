"""What the tools are built from: the model loader and options every command line shares
(``cli``), the datasets and collator (``data``), tiny random models (``tiny``), FSDP2 sharding
(``fsdp``), and the parts of the training entry point and of the lmms-eval plugin. The public
entry points themselves (``atp_llava.train``, ``atp_llava.trainer``, ``atp_llava.report``,
``atp_llava.visualize``, ``atp_llava.lmms_eval_model``) stay at the top of the package, at the
names users run and import; DESIGN §2.3."""
