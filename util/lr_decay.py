"""Layer-wise learning-rate decay parameter groups for fine-tuning the MAGE ViT classifier.

Layer ids: 0 for the embeddings (token_emb, patch_embed, cls_token, pos_embed), i + 1 for blocks.i, and
num_layers = len(blocks) + 1 for everything after the blocks (norms, head). A group's lr_scale is
layer_decay ** (num_layers - layer_id). Parameters with one dimension (biases, norms) and those in
no_weight_decay_list get no weight decay. Frozen parameters (the tokenizer) are left out.
"""

EMBEDDING_PREFIXES = ("token_emb", "patch_embed", "cls_token", "pos_embed")


def get_layer_id(name, num_layers):
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=0.75):
    """AdamW param groups, one per (layer id, decay or not), each carrying lr_scale and weight_decay."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in no_weight_decay_list
        layer_id = get_layer_id(name, num_layers)
        key = (layer_id, "no_decay" if no_decay else "decay")
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "layer_id": layer_id, "lr_scale": scales[layer_id],
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
