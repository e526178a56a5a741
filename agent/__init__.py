"""The CodeAct engine: a pure core with no I/O and no framework.

Read in this order: ``models`` (the task spec and result), ``events``, ``sandbox`` and
``llm`` (the two ports), ``actions`` (parsing replies), ``observation``, ``prompts``,
``graders`` and finally ``loop`` (the generator that ties them together).
"""
