package wireguard

import (
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// ReadDevice reads device name in namespace ns through wgctrl (for tests).
func ReadDevice(ns netns.NsHandle, name string) (*wgtypes.Device, error) {
	var d *wgtypes.Device
	err := withClient(ns, func(c *wgctrl.Client) error {
		var err error
		d, err = deviceState(c, name)
		return err
	})
	return d, err
}

// ConfigureDevice changes device name in ns through wgctrl (for tests that
// play an operator).
func ConfigureDevice(ns netns.NsHandle, name string, cfg wgtypes.Config) error {
	return withClient(ns, func(c *wgctrl.Client) error { return c.ConfigureDevice(name, cfg) })
}
