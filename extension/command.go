package extension

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/internal/nlsafe"
)

// maxLogOutput caps the output of a command kept for the log and errors.
const maxLogOutput = 4096

// runner runs the configured commands in one network namespace.
type runner struct {
	ns      netns.NsHandle
	environ []string
	timeout time.Duration
	log     *slog.Logger
}

// result is what one command run produced.
type result struct {
	stdout, stderr string
}

// argv splits line on white space and expands $VAR and ${VAR} in every
// word from vars, then from environ; unknown variables expand to "". The
// values are never split again nor interpreted: a peer's data cannot add
// words or run anything.
func argv(line string, vars, environ []string) []string {
	lookup := map[string]string{}
	for _, list := range [][]string{environ, vars} {
		for _, e := range list {
			k, v, _ := strings.Cut(e, "=")
			lookup[k] = v
		}
	}
	words := strings.Fields(line)
	for i, w := range words {
		words[i] = os.Expand(w, func(k string) string { return lookup[k] })
	}
	return words
}

// run runs line (the which command, e.g. "SubnetAddCommand") with vars
// added to the environment and stdin followed by a newline on its standard
// input, in r.ns, killed with its process group after r.timeout or when
// ctx ends. Its output is logged. A non-zero exit, a timeout or a failure
// to start is an error naming the command and holding its output.
func (r *runner) run(ctx context.Context, which, line string, vars []string, stdin string, log *slog.Logger) (result, error) {
	args := argv(line, vars, r.environ)
	if len(args) == 0 {
		return result{}, fmt.Errorf("%s: empty command", which)
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(append([]string(nil), r.environ...), vars...)
	cmd.Stdin = strings.NewReader(stdin + "\n")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// Its own process group, so a timeout kills what a script started too;
	// WaitDelay stops waiting for pipes a surviving grandchild holds open.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	// The child inherits the namespace of the thread that forks it.
	err := nlsafe.InNamespace(r.ns, cmd.Start)
	if err == nil {
		err = cmd.Wait()
	}
	res := result{stdout: stdout.String(), stderr: stderr.String()}
	out := clip(strings.TrimSpace(res.stdout + res.stderr))
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("timed out after %v (%w)", r.timeout, err)
		}
		log.Warn("command failed", "command", which, "argv", args, "output", out, "err", err)
		if out != "" {
			return res, fmt.Errorf("%s %q: %w: output: %s", which, args[0], err, out)
		}
		return res, fmt.Errorf("%s %q: %w", which, args[0], err)
	}
	log.Info("command ran", "command", which, "argv", args, "output", out)
	return res, nil
}

func clip(s string) string {
	if len(s) > maxLogOutput {
		return s[:maxLogOutput] + "…"
	}
	return s
}
