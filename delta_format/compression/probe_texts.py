# ruff: noqa: E501  (one passage a line: the texts are data)
"""The text a data-free compression fits the fine-tune's outputs on (`probe.probe_batches`): short
passages of everyday English written for this project (news, instructions, letters, recipes,
science, fiction, dialogue, search queries), a little source code, and a few sentences in French,
German, Spanish, Chinese and Russian, so that the model reads what text usually looks like, not
uniform random token ids.

Measured (benchmarks/RESULTS.md, "Built-in probe text"): on MiniLM, fitting the budget's factors
to the outputs on this text kept as much as 16 of the fine-tune's own calibration texts, and on
the trained tiny Llama it let a language model be refined without data at all (random tokens made
it worse). None of it comes from the benchmarks' corpora (the Python standard library's
docstrings), so those figures are not flattered by overlap.
"""

PROBE_TEXTS: tuple[str, ...] = (
    "The train to the coast was late again this morning, so most of us waited on the platform with coffee and talked about the weather. By the time it arrived, the sun had come out and nobody seemed to mind the delay.",
    "To make a simple tomato sauce, warm two spoons of olive oil in a pan, add a chopped onion and a clove of garlic, and cook them slowly until soft. Pour in the tomatoes, season with salt, and let it simmer for twenty minutes.",
    "The committee met on Tuesday to review the budget for next year. Several members asked why the costs of maintenance had doubled, and the treasurer promised a detailed report before the next meeting.",
    "Photosynthesis converts light energy into chemical energy. Plants absorb carbon dioxide and water, and with the help of chlorophyll they produce glucose and release oxygen into the air.",
    "If you cannot log in to your account, first check that the caps lock key is off. You can reset your password from the sign-in page; a link will be sent to the email address you registered with.",
    "She had lived in the same small house by the river for forty years, and she knew every sound it made at night: the creak of the stairs, the wind in the chimney, the water running under the bridge.",
    "The city council approved a plan to add new bicycle lanes along the main avenue. Supporters say the lanes will make commuting safer, while some shop owners worry about losing parking spaces in front of their stores.",
    "A prime number is a natural number greater than one that has no divisors other than one and itself. The first few primes are 2, 3, 5, 7, 11 and 13, and there are infinitely many of them.",
    "Thank you for your order! Your package has been shipped and should arrive within three to five business days. You can track its progress at any time using the number in this message.",
    "During the second half the home team changed its tactics, pressing higher up the field and passing more quickly. The equaliser came in the seventy-eighth minute, and the crowd stayed on its feet until the final whistle.",
    "def mean(values):\n    if not values:\n        raise ValueError('mean of an empty list')\n    return sum(values) / len(values)",
    "Patients should take the medicine twice a day with food. If you miss a dose, take it as soon as you remember, but do not take two doses at the same time. Contact your doctor if the symptoms do not improve.",
    "The museum's new exhibition brings together paintings, letters and photographs from the early twentieth century, showing how artists responded to the rapid growth of cities and the arrival of electric light.",
    "Interest rates rose for the third time this year as the central bank tried to slow inflation. Economists expect borrowing costs to remain high until prices stabilise, which could take several more months.",
    "My grandfather taught me to fish when I was seven. We would row out before dawn, and he would tell me stories about the war while we waited, in a low voice so as not to scare the fish away.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on a mountain, because the air pressure is lower. This is why cooking pasta takes longer at high altitude.",
    "Please remember that the library will be closed on Monday for the public holiday. Books that are due that day can be returned on Tuesday without a late fee.",
    "The software update fixes a bug that caused the application to crash when opening large files, improves the speed of search, and adds support for dark mode on all platforms.",
    "Volcanoes form where molten rock from deep inside the earth rises to the surface. Some erupt violently, throwing ash high into the sky, while others release slow rivers of lava that cool into new land.",
    "Could you send me the slides from yesterday's presentation? I would like to go through the numbers again before I write the summary for the team.",
    "The hotel was clean and quiet, and the staff were friendly, but the breakfast was disappointing and the room was much smaller than it looked in the pictures. I would stay there again only for one night.",
    "In 1969 two astronauts walked on the surface of the moon while a third orbited above them. Their footprints are still there today, because there is no wind or rain to wash them away.",
    "SELECT name, count(*) AS orders FROM customers JOIN purchases ON customers.id = purchases.customer_id GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "Regular exercise improves sleep, mood and memory. Even a short walk every day can lower blood pressure and reduce the risk of heart disease, according to several large studies.",
    "The old bridge, built of stone more than three hundred years ago, is closed to cars but remains a favourite place for walkers, who stop in the middle to watch the boats pass underneath.",
    "To assemble the shelf, attach the two side panels to the base with the long screws, then slide the back panel into the grooves. Do not tighten the screws completely until all the parts are in place.",
    "Honeybees communicate the location of flowers through a dance. The angle of the dance shows the direction relative to the sun, and its length tells the other bees how far they need to fly.",
    "The negotiations ended late on Friday night without an agreement. Both sides said they were willing to keep talking, but neither was ready to give up its main demands.",
    "He opened the letter slowly, afraid of what it might say. Inside was a single sheet of paper with three words written in his sister's careful handwriting: come home soon.",
    'for (int i = 0; i < n; i++) {\n    total += prices[i] * quantities[i];\n}\nprintf("total: %d\\n", total);',
    "Students who read for pleasure tend to write better, have larger vocabularies and do better in other subjects as well. Teachers can help by letting children choose their own books.",
    "The forecast for the weekend calls for heavy rain on Saturday and strong winds along the coast, with clearer skies expected on Sunday afternoon. Temperatures will stay below average.",
    "Our company was founded in a small garage with two employees and one computer. Today we have offices in twelve countries, but we still believe that good ideas can come from anyone.",
    "A neural network learns by adjusting the weights of its connections to reduce the error between its predictions and the correct answers, using an algorithm called gradient descent.",
    "Le petit village se trouve au pied de la montagne. Chaque matin, les habitants se retrouvent au marché pour acheter du pain frais, du fromage et des légumes.",
    "Die Stadt plant, im nächsten Jahr eine neue Schule zu bauen, weil die Zahl der Kinder in den letzten Jahren stark gestiegen ist.",
    "El museo abre todos los días de diez a seis, excepto los lunes. La entrada es gratuita para estudiantes y para mayores de sesenta y cinco años.",
    "Why is the sky blue? Sunlight contains all colours, but the short blue waves are scattered much more by the molecules of the air than the longer red ones, so blue light reaches our eyes from every direction.",
    "I'm sorry I missed your call. I was in a meeting all afternoon. Are you free tomorrow at ten? If not, just let me know a time that works for you.",
    "The report found that nearly a third of the food produced in the world is lost or wasted, while millions of people still do not have enough to eat.",
    "Mix the flour, sugar and baking powder in a large bowl. In another bowl, beat the eggs with the milk and melted butter, then stir everything together until just combined. Bake for twenty-five minutes.",
    "The defendant told the court that he had been at home on the night of the robbery, but two witnesses said they saw him near the shop shortly before midnight.",
    "Error: the file 'config.yaml' could not be found. Check that the path is correct and that you have permission to read it, then run the command again.",
    "Whales are mammals, not fish: they breathe air, give birth to live young and feed them with milk. The blue whale is the largest animal that has ever lived, larger than any dinosaur.",
    "After years of decline, the number of visitors to the national park is growing again, thanks to new trails, a renovated visitor centre and cheaper bus connections from the city.",
    "The recipe calls for 250 grams of butter, 3 eggs, 400 ml of milk and a pinch of salt. It serves four people and takes about 45 minutes to prepare.",
    "As the sun went down, the market filled with the smell of grilled meat and fresh bread, and musicians began to play at the corner of the square while children danced around them.",
    "Researchers have developed a new battery that can be charged in minutes and keeps most of its capacity after thousands of cycles, which could make electric cars cheaper and more practical.",
    "how do I reset my wifi router to factory settings",
    "best places to eat near the central station",
    "What is the difference between a virus and a bacterium?",
    "cheap flights from London to Lisbon in March",
    "symptoms of vitamin D deficiency in adults",
    "Q: How long does it take to learn to play the piano? A: It depends on how often you practise, but most people can play simple songs after a few months of regular lessons.",
    "- Buy milk and eggs\n- Call the plumber about the kitchen sink\n- Pick up the children at 4 pm\n- Send the invoice to the client",
    "Dear Ms. Patel, I am writing to apply for the position of project manager advertised on your website. I have eight years of experience leading teams in the construction industry.",
    "const total = items.reduce((sum, item) => sum + item.price, 0);\nconsole.log(`Total: ${total.toFixed(2)}`);",
    "The company reported revenue of 4.2 billion dollars for the quarter, up 12 percent from a year earlier, and raised its forecast for the full year.",
    "Chapter One. It was the coldest winter anyone in the valley could remember. The lake froze so thick that the farmers drove their carts across it to reach the town on the other side.",
    "Many languages borrow words from one another. English took 'piano' from Italian, 'kindergarten' from German and 'tea' from Chinese, often changing the pronunciation along the way.",
    "A: Did you finish the report? B: Almost. I still need to check the figures in the last section. A: Okay, send it to me when you're done and I'll take a look tonight.",
    "The theory of evolution explains how species change over many generations through natural selection: individuals with traits that help them survive are more likely to pass those traits on.",
    "今天天气很好，我们去公园散步吧。",
    "Москва — столица России и один из крупнейших городов Европы.",
)

__all__ = ["PROBE_TEXTS"]
