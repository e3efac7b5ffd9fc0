package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Proc is one long-running process of a harness (a daemon of a test
// cluster or host) with its log file.
type Proc struct {
	Name string
	Log  string
	Cmd  *exec.Cmd
	// Group: the process leads its own process group and Stop signals
	// the whole group.
	Group bool
	done  chan struct{}
}

// StartProc starts cmd with its output appended to logFile; with group,
// in a process group of its own. The process is killed when the
// harness's process dies (Pdeathsig).
func StartProc(name, logFile string, cmd *exec.Cmd, group bool) (*Proc, error) {
	f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	cmd.SysProcAttr.Setpgid = group
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, Log: logFile, Cmd: cmd, Group: group, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

// Done is closed once the process has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop sends sig (to the group with Group) and waits up to grace, then
// kills. A nil or exited Proc is left alone.
func (p *Proc) Stop(sig syscall.Signal, grace time.Duration) {
	if p == nil || p.Exited() {
		return
	}
	pid := p.Cmd.Process.Pid
	if p.Group {
		pid = -pid
	}
	_ = syscall.Kill(pid, sig)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = syscall.Kill(pid, syscall.SIGKILL)
		<-p.done
	}
}

// Tail is the last n lines of the process's log ("" for a nil Proc).
func (p *Proc) Tail(n int) string {
	if p == nil {
		return ""
	}
	return TailFile(p.Log, n)
}

// TailFile is the last n lines of the file at path ("" when unreadable).
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
