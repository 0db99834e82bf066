"""data2vec 1.0 and 2.0 in one model (data2vec 1.0 §3, data2vec 2.0 §3).

    forward = forward_teacher (targets from the unmasked input, once per sample)
            + forward_student (v1: masked input with mask embeddings, linear head;
                               v2: kept tokens only, conv decoder, ``clone_batch`` views)
            + forward_loss   (regression at masked positions)

A dict of modality encoders sits in front of one shared stack of Transformer blocks.
The EMA teacher owns copies of the shared blocks and of the encoder parts after the
local features; it is stepped by ``ema_step`` once per optimizer update.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .audio import AudioEncoder
from .compile import CompiledBlocksMixin
from .ema import EMATeacher, ema_decay_at
from .encoder import ModalityEncoder
from .image import ImageEncoder
from .loss import CollapseMonitor, channel_std, regression_loss
from .masking import kept_positions
from .settings import Data2VecSettings
from .targets import build_targets
from .text import TextEncoder
from .transformer import Block, attention_bias

EMA_KEY = "_ema"
MASTERS_KEY = "_fp32_masters"  # fp32 master weights of a bf16/fp16 student, by parameter name
ENCODERS = {"audio": AudioEncoder, "image": ImageEncoder, "text": TextEncoder}  # modality name -> encoder class
logger = logging.getLogger(__name__)


def regression_head(dim: int, layers: int) -> nn.Module:
    """data2vec 1.0 prediction head: Linear(D, D) (1 layer), else Linear(D, 2D), then
    (GELU, Linear(2D, 2D)) x (layers - 2), GELU, Linear(2D, D) (text: 2 layers)."""
    if layers < 1:
        raise ValueError(f"head_layers={layers} must be >= 1")
    if layers == 1:
        return nn.Linear(dim, dim)
    mods = [nn.Linear(dim, 2 * dim)]
    for _ in range(layers - 2):
        mods += [nn.GELU(), nn.Linear(2 * dim, 2 * dim)]
    return nn.Sequential(*mods, nn.GELU(), nn.Linear(2 * dim, dim))


def init_bert_params(module: nn.Module) -> None:
    """N(0, 0.02) for Linear weights (zero bias) and for embedding tables (zero padding
    row), as BERT and the reference. Embeddings matter: at PyTorch's N(0, 1) default, Adam's
    steps of about lr move a table 50x slower relative to its scale, and text pretraining
    at demo scale then learned nothing the classifier could use (README, Text)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def parse_modalities(text: str) -> Tuple[str, ...]:
    """``"audio,text"`` -> ("audio", "text"), each a known modality."""
    names = tuple(m.strip() for m in str(text).split(",") if m.strip())
    unknown = [m for m in names if m not in ENCODERS]
    if unknown or not names:
        raise ValueError(f"modalities={text!r}: each must be one of {sorted(ENCODERS)}")
    return names


class Data2Vec(CompiledBlocksMixin, nn.Module):
    def __init__(self, settings: Data2VecSettings):
        super().__init__()
        s = settings
        if s.algorithm not in ("v1", "v2"):
            raise ValueError(f"algorithm={s.algorithm!r}: choose v1 (data2vec 1.0) or v2 (data2vec 2.0)")
        if s.loss_scale is not None and s.loss_scale <= 0:
            raise ValueError(f"loss_scale={s.loss_scale}: give a positive factor, or null for 1/sqrt(embed_dim)")
        self.settings = settings
        self.algorithm = s.algorithm
        self.modality_encoders = nn.ModuleDict(
            {m: ENCODERS[m](settings, self.make_block) for m in settings.modalities}
        )
        if not 1 <= s.average_top_k_layers <= s.depth:
            raise ValueError(f"average_top_k_layers={s.average_top_k_layers}: targets average 1 to depth={s.depth} "
                             "of the shared blocks; lower it or raise depth")
        self.blocks = nn.ModuleList(self.make_block(i, s.depth) for i in range(s.depth))
        self.dropout_input = nn.Dropout(s.dropout_input)
        # pre-LN blocks leave their residual stream unnormalised: one LayerNorm after the last
        # block (the official ``norm``, present only with layer_norm_first; not in the teacher)
        self.norm = nn.LayerNorm(s.embed_dim, eps=s.norm_eps) if s.layer_norm_first else None
        self.final_proj = regression_head(s.embed_dim, s.head_layers) if s.algorithm == "v1" else None
        self.apply(init_bert_params)
        for enc in self.encoders():
            enc.reset_parameters()
        self.num_updates = 0
        self.ema_decay = s.ema_decay
        self.ema_steps = 0
        self.collapse = CollapseMonitor(
            s.min_target_var, s.min_pred_var, s.collapse_check_start_update, s.collapse_patience
        )
        self.teacher: Optional[EMATeacher] = None
        self.make_teacher()
        if s.compile_blocks:
            self.compile_blocks()
        self.masters: Dict[int, Tensor] = {}  # the optimizer's fp32 masters by id(parameter), saved beside the student
        self.restored_masters: Dict[str, Tensor] = {}  # masters read from a checkpoint, for the optimizer
        self._register_state_dict_hook(_teacher_to_ema_entry)
        self._register_load_state_dict_pre_hook(_ema_entry_to_teacher, with_module=True)

    def encoders(self) -> Tuple[ModalityEncoder, ...]:
        return tuple(self.modality_encoders.values())

    def make_block(self, i: int, depth: int) -> Block:
        s = self.settings
        return Block(
            s.embed_dim, s.num_heads, s.mlp_ratio, s.norm_eps, s.encoder_dropout, s.attention_dropout,
            s.activation_dropout, s.post_mlp_dropout, s.drop_path * i / max(1, depth - 1), s.layer_norm_first,
        )

    def make_teacher(self) -> None:
        encoders = nn.ModuleDict({m: enc.teacher_copy() for m, enc in self.modality_encoders.items()})
        copy_prefixes = tuple(
            f"modality_encoders.{m}.{name}." for m, enc in self.modality_encoders.items() for name in enc.ema_copied
        )
        self.teacher = EMATeacher({"modality_encoders": encoders, "blocks": self.blocks}, copy_prefixes)

    # -- EMA ---------------------------------------------------------------------------
    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def ema_step(self, num_updates: int, masters: Optional[Dict[int, Tensor]] = None) -> None:
        """Called once after each optimizer update; ``num_updates`` counts that update;
        ``masters``: fp32 master weights by id(parameter) (see ``EMATeacher.step``), also kept
        for the checkpoint, so that a resumed bf16/fp16 run continues from them."""
        if masters:
            self.masters = masters
        self.ema_decay = ema_decay_at(num_updates, self.settings.ema_decay, self.settings.ema_end_decay, self.settings.ema_anneal_end_step)
        if self.teacher is not None and self.ema_decay < 1.0:
            self.teacher.step(self, self.ema_decay, masters)
            self.ema_steps += 1

    # -- forward -----------------------------------------------------------------------
    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                modality: Optional[str] = None, **unused) -> Dict:
        """source: modality input (audio (B, L), image (B, C, H, W), text (B, T)); mask:
        (B * clone_batch, T) bool, True = masked (drawn here if None). Returns losses,
        sample_size and diagnostics."""
        modality = self.pick_modality(modality)
        enc = self.modality_encoders[modality]
        feats, pad = enc.local_features(source, padding_mask)  # (B, T, D), (B, T) | None
        if mask is None:
            B, T, _ = feats.shape
            mask = enc.masking(enc.frame_lengths(pad, B, T), T).to(source.device)
        targets, _ = self.forward_teacher(modality, feats, pad, source)  # (B, T, D) fp32
        feats = enc.student_features(feats, source, padding_mask, mask)
        pred, cls_pred = self.forward_student(modality, feats, pad, mask)  # (N, D), (BM, D) | None
        return self.forward_loss(pred, targets, mask, cls_pred, enc.cls_loss_weight)

    def pick_modality(self, modality: Optional[str]) -> str:
        """The named modality, or the only one the model has."""
        if modality is None and len(self.modality_encoders) == 1:
            return next(iter(self.modality_encoders))
        if modality not in self.modality_encoders:
            raise ValueError(f"modality {modality!r}: choose one of this model's encoders ({', '.join(self.modality_encoders)})")
        return modality

    def encode(self, enc: ModalityEncoder, x: Tensor, padding_mask: Optional[Tensor], positions: Tensor,
               blocks: nn.ModuleList, keep_last: Optional[int] = 0, student: bool = True):
        """Extra tokens + context stage + shared blocks. x: (B, K, D) with positions added;
        positions: (B, K) index of each token (for ALiBi). Returns (B, E + K, D) (pre-LN
        students: after the final ``norm``) and the blocks' FFN outputs, extra tokens
        included. The teacher (``student=False``) runs without input dropout."""
        if enc.num_extra:
            x = torch.cat([enc.extra_tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
            if padding_mask is not None:
                padding_mask = nn.functional.pad(padding_mask, (enc.num_extra, 0), value=False)
        bias = attention_bias(padding_mask, enc.alibi(positions), x.dtype)
        x = enc.context(x, bias)
        if student:
            x = self.dropout_input(x)
        x, layer_outputs = self.run_shared_blocks(blocks, x, bias, self.settings.layerdrop, keep_last)
        if student and self.norm is not None and len(blocks) == len(self.blocks):
            x = self.norm(x)  # the student's output after all blocks (decoder input, features)
        return x, layer_outputs

    @torch.no_grad()
    def forward_teacher(self, modality: str, feats: Tensor, padding_mask: Optional[Tensor], source: Optional[Tensor] = None):
        """feats: (B, T, D) student local features -> targets (B, T, D) fp32 from the top-K
        FFN outputs of the teacher, and those outputs. The student encoder says what the
        teacher reads (``teacher_features``) and whose context stage it runs (``teacher_encoder``)."""
        student_enc, teacher_enc = self.modality_encoders[modality], self.teacher.modality_encoders[modality]
        feats, padding_mask = student_enc.teacher_features(teacher_enc, feats, padding_mask, source)
        enc = student_enc.teacher_encoder(teacher_enc)
        K, E = self.settings.average_top_k_layers, enc.num_extra
        x = enc.add_positions(feats.detach().float(), padding_mask)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        _, layer_outputs = self.encode(enc, x, padding_mask, positions, self.teacher.blocks, keep_last=K, student=False)
        layer_outputs = [y[:, E:] for y in layer_outputs]
        return self.make_targets(layer_outputs, padding_mask), layer_outputs

    def make_targets(self, layer_outputs, padding_mask: Optional[Tensor]) -> Tensor:
        """FFN outputs of the top K blocks, each (B, T, D) without extra tokens -> the
        normalised average (B, T, D) fp32 (padding excluded from statistics if padding_aware)."""
        norm_pad = padding_mask if self.settings.padding_aware else None
        return build_targets(layer_outputs, self.settings.average_top_k_layers, self.settings.target_layer_norm,
                             self.settings.target_final_norm, norm_pad)

    def forward_student(self, modality: str, feats: Tensor, padding_mask: Optional[Tensor], mask: Tensor):
        """-> predictions at masked positions (N, D), row-major over (B * clone_batch, T), and
        the student's output at the last extra token (B * clone_batch, D) or None."""
        enc = self.modality_encoders[modality]
        M, E = self.settings.clone_batch, enc.num_extra
        x = feats.repeat_interleave(M, 0) if M > 1 else feats  # (BM, T, D)
        pad = padding_mask.repeat_interleave(M, 0) if padding_mask is not None and M > 1 else padding_mask
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (batch * clone_batch, frames) = {tuple(x.shape[:2])}")
        if self.algorithm == "v1":
            if enc.mask_emb is not None:  # (text masks its token ids instead)
                x = torch.where(mask.unsqueeze(-1), enc.mask_emb.to(x.dtype), x)
            x = enc.add_positions(x, pad)
            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            h, _ = self.encode(enc, x, pad, positions, self.blocks)
            return self.final_proj(h[:, E:][mask]), None
        keep_ids, keep_pad = kept_positions(mask)  # (BM, K)
        x = enc.add_positions(x, pad, zero_mask=mask)
        x = torch.gather(x, 1, keep_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (BM, K, D)
        if pad is not None:
            keep_pad = keep_pad | torch.gather(pad, 1, keep_ids)
        h, _ = self.encode(enc, x, keep_pad if keep_pad.any() else None, keep_ids, self.blocks)
        cls_pred = h[:, E - 1] if E else None
        return enc.decoder(self.decoder_input(h[:, E:], keep_ids, keep_pad, mask), mask), cls_pred

    def decoder_input(self, h: Tensor, keep_ids: Tensor, keep_pad: Tensor, mask: Tensor) -> Tensor:
        """Encoder output at kept positions (BM, K, D) -> full sequence (BM, T, D) with
        N(0, mask_noise_std) at masked positions."""
        h = nn.functional.dropout(h, self.settings.decoder_input_dropout, self.training)
        BM, T = mask.shape
        full = h.new_empty(BM, T + 1, h.shape[-1]).normal_(0, self.settings.mask_noise_std)
        slots = keep_ids.masked_fill(keep_pad & mask.gather(1, keep_ids), T)  # filler entries -> trash slot T
        full.scatter_(1, slots.unsqueeze(-1).expand_as(h), h)
        return full[:, :T]

    def forward_loss(self, pred: Tensor, targets: Tensor, mask: Tensor, cls_pred: Optional[Tensor] = None,
                     cls_weight: float = 0.0) -> Dict:
        """pred: (N, D); targets: (B, T, D) -> regression at the N masked positions; with
        ``cls_pred`` (BM, D) and a weight, the v2 image CLS loss against the mean target,
        scaled by N so that it is ``cls_weight`` x the per-view sum after fairseq divides by N."""
        M = self.settings.clone_batch
        y = (targets.repeat_interleave(M, 0) if M > 1 else targets)[mask]  # (N, D)
        loss = regression_loss(pred, y, self.settings.loss, self.settings.loss_beta, self.settings.loss_scale)
        losses = {"regression": loss.sum()}
        sample_size = int(mask.sum())
        if cls_pred is not None and cls_weight > 0:
            cls_target = targets.mean(1).repeat_interleave(M, 0)  # (BM, D)
            cls = regression_loss(cls_pred, cls_target, self.settings.loss, self.settings.loss_beta, self.settings.loss_scale)
            losses["cls"] = cls.sum() * cls_weight * sample_size
        target_var, pred_var = channel_std(y), channel_std(pred)
        if self.training:
            self.collapse.check(self.num_updates, float(target_var), float(pred_var))
        return {
            "losses": losses,
            "sample_size": sample_size,
            "target_var": target_var,
            "pred_var": pred_var,
            "masked_pct": float(mask.float().mean()),
            "ema_decay": self.ema_decay,
        }

    # -- feature extraction / fine-tuning ------------------------------------------------
    def extract_features(self, source: Tensor, padding_mask: Optional[Tensor] = None, modality: Optional[str] = None,
                         layer: Optional[int] = None, masker: Optional[Callable] = None) -> Dict:
        """Student features: x (B, T, D) without extra tokens, padding_mask (B, T) | None,
        layer_results (per block FFN output, extra tokens included), extra (B, E, D) the
        extra-token outputs (image CLS); ``layer`` stops after that block (0-based). ``masker(feats, padding_mask,
        encoder) -> feats`` corrupts the local features (fine-tuning masks), else none."""
        enc = self.modality_encoders[self.pick_modality(modality)]
        feats, pad = enc.local_features(source, padding_mask)
        if masker is not None:
            feats = masker(feats, pad, enc)
        x = enc.add_positions(feats, pad)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        blocks = self.blocks if layer is None else self.blocks[: layer + 1]
        x, layer_results = self.encode(enc, x, pad, positions, blocks, keep_last=None)
        return {"x": x[:, enc.num_extra:], "padding_mask": pad, "layer_results": layer_results,
                "extra": x[:, : enc.num_extra]}

    def hidden_states(self, source: Tensor, padding_mask: Optional[Tensor] = None, modality: Optional[str] = None,
                      masker: Optional[Callable] = None) -> Tuple[List[Tensor], Optional[Tensor]]:
        """``extract_features`` keeping every layer: [the shared blocks' input, block 1's output,
        ..., block L's output], each (B, E + T, D) with the extra tokens first (transformers'
        ``output_hidden_states``), and the (B, T) padding mask."""
        states: List[Tensor] = []
        hooks = [self.blocks[0].register_forward_pre_hook(lambda mod, args: states.append(args[0]))]
        hooks += [blk.register_forward_hook(lambda mod, i, o: states.append(o[0])) for blk in self.blocks]
        try:
            out = self.extract_features(source, padding_mask, modality, masker=masker)
        finally:
            for h in hooks:
                h.remove()
        return states, out["padding_mask"]

    def remove_pretraining_modules(self, modality: Optional[str] = None) -> None:
        """Drop the teacher, decoders, regression head (and other modalities)."""
        self.teacher = None
        self.final_proj = None
        for name in list(self.modality_encoders):
            if modality is not None and name != modality:
                del self.modality_encoders[name]
            else:
                self.modality_encoders[name].remove_pretraining_modules()


def _teacher_to_ema_entry(module: Data2Vec, state: Dict, prefix: str, local_metadata) -> None:
    """Store the teacher as one ``_ema`` entry: a dict of fp32 tensors named like the student."""
    tp = prefix + "teacher."
    ema = {k[len(tp):]: state.pop(k) for k in [k for k in state if k.startswith(tp)]}
    if module.teacher is not None:
        state[prefix + EMA_KEY] = ema
    if module.masters:
        state[prefix + MASTERS_KEY] = {n: module.masters[id(p)].detach().clone() for n, p in module.named_parameters()
                                       if id(p) in module.masters}


def _ema_entry_to_teacher(module: Data2Vec, state: Dict, prefix: str, local_metadata, strict, missing, unexpected, errors) -> None:
    masters = state.pop(prefix + MASTERS_KEY, None)
    if masters:  # a bf16/fp16 run's checkpoint: the student at full precision, and the optimizer's masters back
        for k, v in masters.items():
            if prefix + k in state:
                state[prefix + k] = v
        if module.teacher is not None:  # a pretraining run resumes: its optimizer takes them (tasks/base.py)
            module.restored_masters = dict(masters)
    ema = state.pop(prefix + EMA_KEY, None)
    if module.teacher is None:
        return
    if ema is None:  # a checkpoint without its teacher: restart the teacher from the student
        logger.warning("checkpoint has no %r entry: the teacher starts as a copy of the student", EMA_KEY)
        ema = {k: state[prefix + k] for k, _ in module.teacher.state_dict().items() if prefix + k in state}
    for k, v in ema.items():
        state[prefix + "teacher." + k] = v
