"""Live previews for MAGI-1 Sampler through ComfyUI's progress bar, as ComfyUI's own samplers send them
(latent_preview.py): a ``("JPEG", PIL image, args.preview_size)`` tuple per step, none when ComfyUI runs
with ``--preview-method none`` (its default). The image is the denoised estimate of the chunk closest to
done, projected to RGB by the latent-to-RGB map fitted from the connected VAE (magi1/video/preview.py); MAGI-1
has no TAESD, so every other preview method gets this projection (as ComfyUI falls back to Latent2RGB)."""

from PIL import Image

from comfy.cli_args import LatentPreviewMethod, args

from ..magi1.video.preview import preview_frame, project, projection_for
from .vae import check_vae

PREVIEW_FORMAT = "JPEG"


def previews_enabled():
    """Whether ComfyUI's preview setting (``--preview-method``) asks samplers for previews."""
    return args.preview_method != LatentPreviewMethod.NoPreviews


class LivePreview:
    """``LivePreview(vae)(step_progress)``: the preview for ``ProgressBar.update_absolute``, or None when
    there is no VAE (``vae=None``: no previews) or previews are off. The VAE's projection is fitted on the
    first use of that VAE (a fraction of a second on a GPU) and kept with it."""

    def __init__(self, vae):
        self.projection = None
        if vae is not None and previews_enabled():
            check_vae(vae)
            self.projection = projection_for(vae)

    @property
    def enabled(self):
        return self.projection is not None

    def image(self, step):
        """The PIL image of a ``magi1.StepProgress``: one latent frame at latent resolution (ComfyUI scales
        it to its preview size)."""
        return Image.fromarray(project(preview_frame(step.preview, step.chunks), self.projection).numpy())

    def __call__(self, step):
        if self.projection is None:
            return None
        return PREVIEW_FORMAT, self.image(step), args.preview_size
