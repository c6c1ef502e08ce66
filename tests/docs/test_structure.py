"""The shape of the code, read from its imports: one layer per room, no
cycles, private names private (the done-when of the seams issue)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# namedtuple's public API starts with an underscore
NAMEDTUPLE = {'_fields', '_asdict', '_replace', '_make', '_field_defaults'}


def _modules(package):
  for path in sorted((ROOT / package).rglob('*.py')):
    parts = path.relative_to(ROOT).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    yield name, path, ast.parse(path.read_text())


def _is_module(name):
  path = ROOT / name.replace('.', '/')
  return path.with_suffix('.py').exists() or (path / '__init__.py').exists()


def _bnjax_imports(name, path, tree):
  """(imported module, imported name or None, line) for each bnjax import;
  plus {alias: module} for the names bound to bnjax modules."""
  package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
  found, aliases = [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        up = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(up + ([node.module] if node.module else []))
      if not base.startswith('bnjax'):
        continue
      for a in node.names:
        if _is_module(f'{base}.{a.name}'):
          found.append((f'{base}.{a.name}', None, node.lineno))
          aliases[a.asname or a.name] = f'{base}.{a.name}'
        else:
          found.append((base, a.name, node.lineno))
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith('bnjax'):
          found.append((a.name, None, node.lineno))
          if a.asname:
            aliases[a.asname] = a.name
  return found, aliases


def _in_engine(module):
  return module.startswith('bnjax._moments')


def test_no_import_cycle_in_bnjax():
  graph = {}
  for name, path, tree in _modules('bnjax'):
    found, _ = _bnjax_imports(name, path, tree)
    graph[name] = {m for m, _, _ in found if m != name}

  def visit(node, stack):
    for nxt in sorted(graph.get(node, ())):
      if nxt in stack:
        cycle = stack[stack.index(nxt) :] + [nxt]
        if nxt != 'bnjax' and node != 'bnjax':  # the package's own re-exports
          raise AssertionError(f'import cycle: {" -> ".join(cycle)}')
        continue
      visit(nxt, stack + [nxt])

  for name in graph:
    if name != 'bnjax':
      visit(name, [name])


def test_no_module_uses_another_modules_private_names():
  """Outside the statistics engine (bnjax/_moments/, one layer), a module
  uses only the public names of the modules it imports; private modules
  export unprefixed names for that."""
  bad = []
  for name, path, tree in _modules('bnjax'):
    found, aliases = _bnjax_imports(name, path, tree)
    for module, imported, line in found:
      if (
        imported
        and imported.startswith('_')
        and not (_in_engine(name) and _in_engine(module))
      ):
        bad.append(f'{path.name}:{line} imports {module}.{imported}')
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith('_')
        and not node.attr.startswith('__')
        and node.attr not in NAMEDTUPLE
        and not (_in_engine(name) and _in_engine(aliases[node.value.id]))
      ):
        bad.append(
          f'{path.name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}'
        )
  assert not bad, bad


def test_no_context_variables_in_bnjax():
  """The adapters pass what they mean (the caller's name, whether one value
  per channel is fine) as arguments, not through ambient state."""
  for _, path, _ in _modules('bnjax'):
    assert 'ContextVar' not in path.read_text(), path.name


def test_benchmarks_edit_no_path_and_import_nothing_from_tests():
  """Run as ``python -m benchmarks``: no script-style sys.path edits or
  fallback imports, and the float64 truth computed without tests/."""
  siblings = {p.stem for p in (ROOT / 'benchmarks').glob('*.py')}
  for _, path, tree in _modules('benchmarks'):
    assert 'sys.path' not in path.read_text(), path.name
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        assert not (node.module or '').startswith('tests'), (
          f'{path.name}:{node.lineno} imports from tests'
        )
      if isinstance(node, ast.Import):
        names = {a.name for a in node.names}
        assert not names & siblings, (
          f'{path.name}:{node.lineno}: import {names & siblings} as a script'
        )


# ------------------------------------------- one shape per job (issue 42) ---

STATE_TYPES = {
  'BatchStats',
  'RenormStats',
  'CumulativeStats',
  'DebiasedStats',
  'PooledStats',
}
ADAPTERS = ('bnjax.linen', 'bnjax.nnx', 'bnjax.equinox')


def _functions(tree):
  """Every function and lambda of a module, with its own nodes (a nested
  function's nodes are its own, not its parent's)."""
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      own, todo = [], list(ast.iter_child_nodes(node))
      while todo:
        n = todo.pop()
        own.append(n)
        if not isinstance(
          n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        ):
          todo.extend(ast.iter_child_nodes(n))
      yield node, own


# What takes a value out of a dict by its key, or edits it.
_BY_KEY = {'pop', 'get', 'update', 'setdefault', 'popitem', '__getitem__'}


def _kwargs_splices(tree):
  """(line, what) where a function both forwards its ``**kwargs`` on and
  takes keys out of it or edits it (a carrier of keys between functions),
  or a call splices in a dict of arguments that a function built."""
  for fn, own in _functions(tree):
    kw = getattr(fn.args.kwarg, 'arg', None)
    is_kw = lambda n: isinstance(n, ast.Name) and n.id == kw
    calls = [n for n in own if isinstance(n, ast.Call)]
    spliced = [k.value for n in calls for k in n.keywords if k.arg is None]
    for v in spliced:
      if isinstance(v, ast.Call):
        yield v.lineno, f'**{ast.unparse(v)} splices a built dict of kwargs'
    if not kw or not any(is_kw(v) for v in spliced):
      continue
    for n in own:
      by_key = (
        isinstance(n, ast.Attribute) and is_kw(n.value) and n.attr in _BY_KEY
      ) or (isinstance(n, ast.Subscript) and is_kw(n.value))
      if by_key:
        yield n.lineno, f'{ast.unparse(n)}: a key of the forwarded **{kw}'


def test_no_variant_travels_as_a_string_key_in_kwargs():
  """A variant reaches the core as a typed value (``_train.Correction``,
  ``_act.Spec``), never as a key of ``**kwargs`` that a callee pops and
  splices (issue 42: ``core_kwargs.pop('renorm')`` and
  ``core_kwargs.update(...)`` in the adapters, ``**_renorm.core_kwargs
  (...)``). A function that forwards its ``**kwargs`` forwards them as they
  came (checking a key is fine), and no call splices in a dict that a
  function returned."""
  bad = [
    f'{path.relative_to(ROOT)}:{line}: {what}'
    for _, path, tree in _modules('bnjax')
    for line, what in _kwargs_splices(tree)
  ]
  assert not bad, bad


def _type_tests(own):
  """{subject: {state type names}} of the isinstance/issubclass calls and
  ``type(v) is T`` tests among a function's own nodes, one call a link."""
  links: dict[str, list[set]] = {}
  for n in own:
    subject = names = None
    if (
      isinstance(n, ast.Call)
      and isinstance(n.func, ast.Name)
      and n.func.id in ('isinstance', 'issubclass')
      and len(n.args) == 2
    ):
      subject, kinds = n.args
      elts = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
      names = {ast.unparse(e).rsplit('.', 1)[-1] for e in elts}
    elif (
      isinstance(n, ast.Compare)
      and isinstance(n.left, ast.Call)
      and ast.unparse(n.left.func) == 'type'
      and all(isinstance(op, (ast.Is, ast.Eq)) for op in n.ops)
    ):
      subject = n.left.args[0] if n.left.args else None
      names = {ast.unparse(c).rsplit('.', 1)[-1] for c in n.comparators}
    if subject is not None and names & STATE_TYPES:
      links.setdefault(ast.unparse(subject), []).append(names & STATE_TYPES)
  return links


def _state_type_chains():
  """{function name: 'file:line'} of the functions that test one value
  against two or more state types in separate tests: a rule picked by an
  isinstance chain instead of the state type's row of the rule table."""
  found = {}
  for _, path, tree in _modules('bnjax'):
    for fn, own in _functions(tree):
      for links in _type_tests(own).values():
        if len(links) >= 2 and len(set().union(*links)) >= 2:
          name = getattr(fn, 'name', '<lambda>')
          found[name] = f'{path.relative_to(ROOT)}:{fn.lineno}'
  return found


# Chains in the torch and haiku converters, whose files another change of
# issue 42 moves; each goes when that change routes it through the table
# (bnjax._running.RULES). The test fails if one is gone and still listed.


def test_no_isinstance_chain_over_the_state_types():
  """Each state type owns its rules, one row of ``bnjax._running.RULES``
  (update, population statistics, inference and fallback statistics): no
  function picks a rule by testing a value against several state types
  (issue 42: ``_running.update`` did, over five of them)."""
  chains = _state_type_chains()
  assert not chains, chains


def _collapsed_import_graph():
  """{module: modules it imports} over bnjax, a package (``_moments``,
  ``training``) one node, the package's own ``__init__`` re-exports left
  out; an adapter's private parts (``_nnx_base``, ``_linen_pool``,
  ``_equinox_layer``, ``_equinox_torch``: ``bnjax._<adapter>_*``) are the
  adapter's node."""

  def top(m):
    m = '.'.join(m.split('.')[:2])
    for a in ADAPTERS:
      if m.startswith(f'bnjax._{a.split(".")[1]}_'):
        return a
    return m

  graph: dict[str, set] = {}
  for name, path, tree in _modules('bnjax'):
    if name == 'bnjax':
      continue
    found, _ = _bnjax_imports(name, path, tree)
    deps = graph.setdefault(top(name), set())
    deps |= {top(m) for m, _, _ in found if m != 'bnjax'} - {top(name)}
  return graph


def _longest_chain(graph, start, end):
  """The longest import chain from ``start`` down to ``end``."""
  best: dict[str, list | None] = {}

  def down(node, seen):
    if node == end:
      return [end]
    if node in best:
      return best[node]
    chains = [
      down(n, seen | {n}) for n in sorted(graph.get(node, ())) if n not in seen
    ]
    chains = [c for c in chains if c]
    best[node] = [node] + max(chains, key=len) if chains else None
    return best[node]

  return down(start, {start})


def test_adapters_sit_directly_above_the_core():
  """The adapters import ``_core`` itself, and nothing that imports it (no
  floor between: a variant's typed value comes from its module below the
  core, as ``_ghost``'s), so the longest chain of bnjax imports from
  ``_types`` up to ``training`` is 8 modules or fewer (issue 42: 9, through
  ``_renorm`` and ``_act``, which imported ``_core``)."""
  graph = _collapsed_import_graph()

  def above_core(m, seen=()):
    deps = graph.get(m, set())
    return 'bnjax._core' in deps or any(
      above_core(d, (*seen, m)) for d in deps if d not in seen
    )

  for adapter in ADAPTERS:
    deps = graph[adapter]
    assert 'bnjax._core' in deps, adapter
    between = sorted(d for d in deps if above_core(d) and d not in ADAPTERS)
    assert not between, f'{adapter} reaches the core through {between}'
  chain = _longest_chain(graph, 'bnjax.training', 'bnjax._types')
  assert chain and len(chain) <= 8, ' -> '.join(chain or ())


# The libraries an adapter wraps or converts from: a bnjax module that
# imports one of them (directly, or through another bnjax module) is an
# adapter, whatever its name.
FRAMEWORKS = {'flax', 'equinox', 'torch', 'haiku'}


def _imports(path, tree, root=ROOT):
  """Every module a file imports (absolute names; ``from a import b`` gives
  ``a.b`` where that is a module of this checkout, else ``a``), anywhere in
  the file (function-level imports too)."""
  package = '.'.join(path.relative_to(root).parent.parts)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        up = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(up + ([node.module] if node.module else []))
      found.add(base)
      found |= {
        f'{base}.{a.name}' for a in node.names if _is_module(f'{base}.{a.name}')
      }
  return found


def _adapter_modules():
  """bnjax's adapters: its public submodules (bnjax.linen, .nnx, .equinox,
  .interop, .precise, .training and anything under them), and every private
  module that reaches flax, Equinox, PyTorch or Haiku (bnjax._convert,
  ._state_dict, ...). What remains is the functional core: the package
  ``bnjax`` itself (its __init__ re-exports the functions only), the
  statistics engine and the private modules under the functions."""
  graph = {name: _imports(path, tree) for name, path, tree in _modules('bnjax')}
  adapters = {
    name
    for name in graph
    if '.' in name and not any(p.startswith('_') for p in name.split('.')[1:])
  }
  adapters |= {
    name
    for name, deps in graph.items()
    if {d.split('.')[0] for d in deps} & FRAMEWORKS
  }
  while True:
    more = {
      name
      for name, deps in graph.items()
      if name not in adapters and deps & adapters
    }
    if not more:
      return adapters
    adapters |= more


def _core_tests_importing_adapters(folder, root=ROOT):
  """(file:line, module) for each adapter a test file under ``folder``
  imports, itself or through the helper modules of tests/ and benchmarks/
  it imports (``root``: the checkout ``folder`` is in)."""
  adapters = _adapter_modules()
  helpers = {
    name: (path, tree)
    for package in ('tests', 'benchmarks')
    for name, path, tree in _modules(package)
    if not name.split('.')[-1].startswith('test_')
  }

  def reach(deps, seen):
    hit = set(deps) & adapters
    for dep in sorted(set(deps) - seen):
      if dep in helpers and dep not in adapters:
        seen.add(dep)
        hit |= {
          f'{m} (through {dep})' for m in reach(_imports(*helpers[dep]), seen)
        }
    return hit

  bad = []
  for path in sorted(folder.rglob('*.py')):
    tree = ast.parse(path.read_text())
    bad += [
      (path.name, m) for m in sorted(reach(_imports(path, tree, root), set()))
    ]
  return bad


def test_core_tests_import_no_adapter():
  """tests/core specifies the functional core, so it imports no adapter
  (see _adapter_modules: bnjax.linen, .nnx, .equinox, .interop, .precise,
  .training, and the private modules that reach flax, Equinox, PyTorch or
  Haiku), neither itself nor through a helper of tests/ or benchmarks/. A
  test of a module, an interop converter or a training helper goes in
  tests/modules or tests/interop. flax itself may be imported, as the
  baseline a core test compares with."""
  adapters = _adapter_modules()
  for name in ('bnjax.linen', 'bnjax.nnx', 'bnjax.precise', 'bnjax._convert'):
    assert name in adapters, name  # the rule sees the adapters it names
  assert not adapters & {'bnjax', 'bnjax._core', 'bnjax._moments.local'}
  bad = _core_tests_importing_adapters(ROOT / 'tests' / 'core')
  assert not bad, bad
