package dockerhost

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
)

// notifyConn is the NOTIFY_SOCKET systemd gives a Type=notify service:
// ready receives nil once READY=1 arrives, or the read error.
type notifyConn struct {
	conn  *net.UnixConn
	path  string // the socket's directory
	ready chan error
}

// listenNotify opens the socket in a new directory of its own under the
// temporary directory (a socket path has at most 107 bytes; the hosts'
// roots can be longer). The hosts share /tmp with the harness.
func listenNotify() (string, *notifyConn, error) {
	dir, err := os.MkdirTemp("", "fk-notify-")
	if err != nil {
		return "", nil, err
	}
	path := filepath.Join(dir, "sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	c := &notifyConn{conn: conn, path: dir, ready: make(chan error, 1)}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				c.ready <- err
				return
			}
			for _, l := range bytes.Split(buf[:n], []byte("\n")) {
				if string(l) == "READY=1" {
					c.ready <- nil
					return
				}
			}
		}
	}()
	return path, c, nil
}

// close stops listening; the reader goroutine ends with the socket.
func (c *notifyConn) close() {
	c.conn.Close()
	os.RemoveAll(c.path)
}
