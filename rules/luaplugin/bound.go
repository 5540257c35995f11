package luaplugin

import (
	"reflect"

	lua "github.com/yuin/gopher-lua"
	"github.com/yuin/gopher-lua/ast"
)

// Strings are bounded at MaxString. A time budget alone does not bound
// memory: "s = s .. s" doubles a string per instruction, so 30 of them
// (well inside 50 ms) would ask for a gigabyte. The VM's concatenation
// is an opcode with no hook, so the script's syntax tree is rewritten
// before it is compiled: every "a .. b" becomes a call of concatName,
// which checks the length first. The string functions that can grow a
// string (format, gsub, rep; table.concat) are wrapped the same way.

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

// concat is "a .. b" with MaxString.
func concat(L *lua.LState) int {
	a, b := L.Get(1), L.Get(2)
	for _, x := range []lua.LValue{a, b} {
		if !lua.LVCanConvToString(x) {
			L.RaiseError("attempt to concatenate a %s value", x.Type().String())
		}
	}
	sa, sb := lua.LVAsString(a), lua.LVAsString(b)
	if len(sa)+len(sb) > MaxString {
		L.RaiseError("concatenation: the result would exceed %d bytes", MaxString)
	}
	L.Push(lua.LString(sa + sb))
	return 1
}

// bounded wraps a library function whose first result is a string that
// may grow past MaxString: past it, the call is an error.
func bounded(name string, fn *lua.LFunction) lua.LGFunction {
	orig := fn.GFunction
	return func(L *lua.LState) int {
		n := orig(L)
		if n > 0 {
			if s, ok := L.Get(-n).(lua.LString); ok && len(s) > MaxString {
				L.RaiseError("%s: the result would exceed %d bytes", name, MaxString)
			}
		}
		return n
	}
}
