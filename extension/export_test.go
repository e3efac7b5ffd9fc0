package extension

// Argv exposes argv to the external tests.
var Argv = argv
