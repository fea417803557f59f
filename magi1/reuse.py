"""Token reuse during sampling: the only code that talks to a cache policy (``reuse_contract``).

``start_reuse`` reads the policy once (is it on, does it reuse single tokens, its name for reports);
the driver it returns turns the policy state's decisions into the DiT's ``active`` argument, hands back
the velocities to integrate with (fresh or reused), and hands the state the chunks after every step.
"""

from __future__ import annotations

FEATURE_BATCH_BYTES = 64 * 2**20  # change features of a window up to this size come from one convolution


def start_reuse(policy, model, layout, num_steps):
    """The driver of one run: ``PolicyReuse`` for a policy that is on, else ``NoReuse``."""
    if policy is None or not policy.enabled:
        return NoReuse(layout, "off" if policy is None else policy.mode)
    return PolicyReuse(policy, model, layout, num_steps)


class NoReuse:
    """Without a policy (or with one that is off): every token of every chunk is computed."""

    reusing = False  # some chunks or tokens may be reused (guidance keeps more KV caches then)
    token_level = False  # single tokens may be reused, not only whole chunks

    def __init__(self, layout, mode="off"):
        self.tokens = layout.tokens_per_chunk
        self.mode = mode  # the policy's name in reports

    def decide(self, chunks, chunk_steps, x_noisy, times):
        return None

    def active(self, decisions, chunks):
        """Per chunk: the DiT's ``active`` entry (None: all) and the tokens computed."""
        return [None] * chunks, [self.tokens] * chunks

    def velocities(self, decisions, fresh, dts):
        return fresh

    def observe(self, chunks, chunk_steps, x_new, velocities, times_after, frame_before):
        pass

    def close(self):
        pass


class PolicyReuse(NoReuse):
    """A policy's per-run state driven through one generation of ``model``."""

    reusing = True

    def __init__(self, policy, model, layout, num_steps):
        super().__init__(layout, policy.mode)
        self.token_level = policy.uses_token_weights
        self.model, self.cw = model, layout.chunk_width
        chunk_shape = (model.config.latent_channels, layout.chunk_width,
                       layout.latent_height, layout.latent_width)
        patch = (model.config.patch_size, model.config.patch_size)
        self.state = policy.new_state(num_steps=num_steps, chunk_shape=chunk_shape, patch=patch)

    def decide(self, chunks, chunk_steps, x_noisy, times):
        """The decisions for the window's noisy chunks (at ``times``), from how much their input moved."""
        features = self._change_features(x_noisy, len(chunks))
        return self.state.decide(list(zip(chunks, chunk_steps, features, times)))

    def active(self, decisions, chunks):
        return [d.active for d in decisions], [d.n_active for d in decisions]

    def velocities(self, decisions, fresh, dts):
        return [self.state.velocity(d, v, dt) for d, v, dt in zip(decisions, fresh, dts)]

    def observe(self, chunks, chunk_steps, x_new, velocities, times_after, frame_before):
        cw = self.cw
        self.state.observe([(c, s, x_new[:, j * cw:(j + 1) * cw], velocities[j], times_after[j])
                            for j, (c, s) in enumerate(zip(chunks, chunk_steps))], frame_before)

    def close(self):
        self.state = None

    def _change_features(self, x_noisy, chunks):
        """Each noisy chunk's patch embedding in the model dtype (what the policy compares between
        steps, as released): one convolution for a small window, chunk by chunk for a large one so
        that the float32 intermediate stays chunk-sized."""
        model, cw = self.model, self.cw
        if self.tokens * chunks * model.config.hidden_size * 4 <= FEATURE_BATCH_BYTES:
            embedded = model.patch_embedding(x_noisy[None])[0]
            return [embedded[:, j * cw:(j + 1) * cw].to(model.dtype) for j in range(chunks)]
        return [model.patch_embedding(x_noisy[None, :, j * cw:(j + 1) * cw])[0].to(model.dtype) for j in range(chunks)]
