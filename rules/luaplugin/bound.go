package luaplugin

import (
	"reflect"
	"strings"

	lua "github.com/yuin/gopher-lua"
	"github.com/yuin/gopher-lua/ast"
)

// Strings are bounded at MaxString. A time budget alone does not bound
// memory: "s = s .. s" doubles a string per instruction, so 30 of them
// (well inside 50 ms) would ask for a gigabyte. The VM's concatenation
// is an opcode with no hook, so the script's syntax tree is rewritten
// before it is compiled: every "a .. b" becomes a call of concatName,
// which checks the length first. The library functions that can grow a
// string (format, gsub, rep, table.concat) or the stack (unpack) size
// their result before they build it.

// concatName is the global the rewritten concatenations call; a script
// that overwrites it only breaks its own concatenations.
const concatName = "__policyd_concat"

var concatType = reflect.TypeOf((*ast.StringConcatOpExpr)(nil))

// boundConcat rewrites every concatenation of the chunk.
func boundConcat(chunk []ast.Stmt) {
	walk(reflect.ValueOf(chunk))
}

func walk(v reflect.Value) {
	switch v.Kind() {
	case reflect.Interface:
		if v.IsNil() {
			return
		}
		e := v.Elem()
		walk(e)
		if e.Type() == concatType && v.CanSet() {
			c := e.Interface().(*ast.StringConcatOpExpr)
			call := &ast.FuncCallExpr{Func: &ast.IdentExpr{Value: concatName}, Args: []ast.Expr{c.Lhs, c.Rhs}, AdjustRet: true}
			call.SetLine(c.Line())
			call.SetLastLine(c.LastLine())
			call.Func.SetLine(c.Line())
			call.Func.SetLastLine(c.LastLine())
			v.Set(reflect.ValueOf(call))
		}
	case reflect.Pointer:
		if !v.IsNil() {
			walk(v.Elem())
		}
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				walk(v.Field(i))
			}
		}
	case reflect.Slice:
		for i := range v.Len() {
			walk(v.Index(i))
		}
	}
}

// concat is "a .. b" with MaxString, and with the __concat metamethod
// when either side is no string or number.
func concat(L *lua.LState) int {
	a, b := L.Get(1), L.Get(2)
	if !lua.LVCanConvToString(a) || !lua.LVCanConvToString(b) {
		mm := L.GetMetaField(a, "__concat")
		if mm == lua.LNil {
			mm = L.GetMetaField(b, "__concat")
		}
		if mm == lua.LNil {
			bad := a
			if lua.LVCanConvToString(a) {
				bad = b
			}
			L.RaiseError("attempt to concatenate a %s value", bad.Type().String())
		}
		L.Push(mm)
		L.Push(a)
		L.Push(b)
		L.Call(2, 1)
		return 1
	}
	sa, sb := lua.LVAsString(a), lua.LVAsString(b)
	if len(sa)+len(sb) > MaxString {
		L.RaiseError("concatenation: the result would exceed %d bytes", MaxString)
	}
	L.Push(lua.LString(sa + sb))
	return 1
}

// tableConcat is table.concat, sized before anything is built.
func tableConcat(L *lua.LState) int {
	t := L.CheckTable(1)
	sep := L.OptString(2, "")
	i := L.OptInt(3, 1)
	j := L.OptInt(4, t.Len())
	size := 0
	for k := i; k <= j; k++ {
		v := t.RawGetInt(k)
		if !lua.LVCanConvToString(v) {
			L.RaiseError("invalid value (at index %d) in table for 'concat'", k)
		}
		size += len(lua.LVAsString(v))
		if k < j {
			size += len(sep)
		}
		if size > MaxString {
			L.RaiseError("table.concat: the result would exceed %d bytes", MaxString)
		}
	}
	var b strings.Builder
	b.Grow(size)
	for k := i; k <= j; k++ {
		b.WriteString(lua.LVAsString(t.RawGetInt(k)))
		if k < j {
			b.WriteString(sep)
		}
	}
	L.Push(lua.LString(b.String()))
	return 1
}

// maxUnpack is Lua 5.1's own limit on the values unpack may return: one
// call of it is one instruction, so unpack({}, 1, 1e9) must not try.
const maxUnpack = 8000

func unpack(L *lua.LState) int {
	t := L.CheckTable(1)
	i := L.OptInt(2, 1)
	j := L.OptInt(3, t.Len())
	if i > j {
		return 0
	}
	if j-i >= maxUnpack || j-i < 0 {
		L.RaiseError("too many results to unpack")
	}
	for k := i; k <= j; k++ {
		L.Push(t.RawGetInt(k))
	}
	return j - i + 1
}

// boundedFormat is string.format sized before it runs: Lua's own limits
// (two digits of width or precision) and the arguments' lengths bound
// the result, and past MaxString the call is an error.
func boundedFormat(fn *lua.LFunction) lua.LGFunction {
	orig := fn.GFunction
	return func(L *lua.LState) int {
		f := L.CheckString(1)
		size, arg := len(f), 2
		for k := 0; k < len(f); k++ {
			if f[k] != '%' {
				continue
			}
			k++
			if k < len(f) && f[k] == '%' {
				continue
			}
			start := k
			for k < len(f) && strings.IndexByte("-+ #0", f[k]) >= 0 {
				k++
			}
			if k-start > 5 {
				L.RaiseError("invalid format (repeated flags)")
			}
			digits := func() {
				d := k
				for k < len(f) && f[k] >= '0' && f[k] <= '9' {
					k++
				}
				if k-d > 2 {
					L.RaiseError("invalid format (width or precision too long)")
				}
			}
			digits()
			if k < len(f) && f[k] == '.' {
				k++
				digits()
			}
			// Only Lua's conversions: Go's Sprintf, which runs the format,
			// would also take %[1]s (an argument again and again) and
			// others the count below does not know.
			if k >= len(f) || strings.IndexByte("cdiouxXeEfgGqs", f[k]) < 0 {
				L.RaiseError("invalid option in format (Lua's are %%c %%d %%i %%o %%u %%x %%X %%e %%E %%f %%g %%G %%q %%s)")
			}
			// Width and precision are at most 99 each; a number's
			// longest form (%f of 1e308) is about 320 bytes.
			size += 99 + 99 + 330
			if arg <= L.GetTop() {
				if s, ok := L.Get(arg).(lua.LString); ok {
					// %q may write each byte as an escape, %x as two
					// digits and a space.
					if f[k] == 'q' || f[k] == 'x' || f[k] == 'X' {
						size += 3 * len(s)
					}
					size += len(s)
				}
			}
			arg++
			if size > MaxString {
				L.RaiseError("string.format: the result would exceed %d bytes", MaxString)
			}
		}
		return orig(L)
	}
}
