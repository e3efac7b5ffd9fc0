package vmtest

import (
	"bufio"
	"fmt"
	"io"
	"os"
)

// cpioWriter writes a "newc" cpio archive, the initramfs format.
type cpioWriter struct {
	w   *bufio.Writer
	ino int
	err error
}

func newCpio(w io.Writer) *cpioWriter { return &cpioWriter{w: bufio.NewWriter(w), ino: 1} }

func (c *cpioWriter) header(name string, mode uint32, size int) {
	if c.err != nil {
		return
	}
	c.ino++
	_, c.err = fmt.Fprintf(c.w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	if c.err != nil {
		return
	}
	c.write([]byte(name + "\x00"))
	c.pad(110 + len(name) + 1)
}

func (c *cpioWriter) write(b []byte) {
	if c.err == nil {
		_, c.err = c.w.Write(b)
	}
}

func (c *cpioWriter) pad(n int) {
	if r := n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) dir(name string) { c.header(name, 0o040755, 0) }

func (c *cpioWriter) file(name string, data []byte, perm uint32) {
	c.header(name, 0o100000|perm, len(data))
	c.write(data)
	c.pad(len(data))
}

func (c *cpioWriter) fileFrom(name, host string, perm uint32) error {
	b, err := os.ReadFile(host)
	if err != nil {
		return err
	}
	c.file(name, b, perm)
	return c.err
}

func (c *cpioWriter) symlink(name, target string) {
	c.header(name, 0o120777, len(target))
	c.write([]byte(target))
	c.pad(len(target))
}

func (c *cpioWriter) close() error {
	c.header("TRAILER!!!", 0, 0)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}
