package nlsafe

// WithInterrupts returns h with a hook asked after every dump attempt; when
// it returns true the attempt counts as interrupted (NLM_F_DUMP_INTR).
func WithInterrupts(h Handle, interrupted func(what string) bool) Handle {
	h.interrupted = interrupted
	return h
}
