"""Training and evaluating: LoRA fine-tuning (:mod:`.finetune`), a run folder (:mod:`.run`), the split
(:mod:`.split`), data selection (:mod:`.selection`), evaluation of HF models (:mod:`.evaluate`) and of the
serving backends (:mod:`.eval_resolver`), the scaling-law check (:mod:`.scaling`), fitting the gate
(:mod:`.gate`), tiny test models (:mod:`.tiny`); the presets and hand-written cases they use."""
